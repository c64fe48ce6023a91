"""Build, then commit: a reload whose build fails after the point where live state used to be touched
leaves every breaker, budget, cache and warm loop exactly as it was (and the old generation serving).
Before, the registry re-pointed breakers and budgets and the cache layer restarted warming while the
build could still fail."""
import aiohttp

import sidecar.pipeline.build as pipeline_build
from ops_support import policy, write


def v(ports, ups, *, ratio: str, failures: int, warm: str, extra_routes: str = "") -> str:
    return policy(ports, ups, main="a", extra_routes=extra_routes, main_extra=f"""
        retry: {{max_retries: 1, budget: {{ratio: {ratio}, min_per_second: 1, window: 10s}}}}
        breaker: {{consecutive_failures: {failures}}}
        cache: {{ttl: 1h, warm: [{{path: {warm}, every: 1h}}]}}
        """)


async def test_a_reload_whose_build_fails_changes_nothing(tmp_path, upstream_factory, run_sidecar, ports,
                                                          monkeypatch):
    a = await upstream_factory(name="a")
    path = write(tmp_path / "policy.yaml", v(ports, {"a": a}, ratio="0.2", failures=5, warm="/w"))
    sc = await run_sidecar(path, watch=False)
    async with aiohttp.ClientSession() as s:             # the route's breaker exists once it was used
        async with s.get(f"http://127.0.0.1:{ports['api']}/x") as r:
            assert r.status == 200
    runtime = sc.runtime
    gen = runtime.gen
    state = gen.states["main"]
    before = {
        "states": dict(gen.states), "budget": state.budget, "budget_policy": state.budget.policy,
        "breaker": state.breakers["a"], "breaker_policy": state.breakers["a"].policy,
        "cache": state.cache, "cache_policy": state.cache.policy, "warm_task": state.cache._warm_task,
        "route": state.route,
    }
    assert before["warm_task"] is not None and not before["warm_task"].done()

    # Every piece of state would change: new budget ratio, breaker policy and warm list, and a new route.
    write(path, v(ports, {"a": a}, ratio="0.5", failures=2, warm="/w2", extra_routes="""
        - name: added
          match: {path_prefix: /added}
          upstream: a
        """))
    real = pipeline_build.layers_for

    def failing(route, *args, **kwargs):               # the last step of the build: the stacks
        if route.name == "added":
            raise RuntimeError("boom while building the new generation")
        return real(route, *args, **kwargs)
    monkeypatch.setattr(pipeline_build, "layers_for", failing)
    ok, error = await runtime.reload()
    assert not ok and "boom while building" in error

    assert runtime.gen is gen
    state = runtime.gen.states["main"]
    after = {
        "states": dict(gen.states), "budget": state.budget, "budget_policy": state.budget.policy,
        "breaker": state.breakers["a"], "breaker_policy": state.breakers["a"].policy,
        "cache": state.cache, "cache_policy": state.cache.policy, "warm_task": state.cache._warm_task,
        "route": state.route,
    }
    for name, value in before.items():
        same = after[name] == value if name == "states" else after[name] is value   # a dict: same objects
        assert same, f"{name} changed by a reload that failed"
    assert not after["warm_task"].done(), "the warm loop was stopped"
    assert runtime.registry.all() == list(before["states"].values())

    # The same edit, built without the failure, commits: the live state moves over.
    monkeypatch.setattr(pipeline_build, "layers_for", real)
    ok, error = await runtime.reload()
    assert ok, error
    state = runtime.gen.states["main"]
    assert state.breakers["a"] is before["breaker"] and state.breakers["a"].policy.consecutive_failures == 2
    assert state.budget is not before["budget"] and state.budget.policy.ratio == 0.5
    assert state.cache is before["cache"] and state.cache._warm_task is not before["warm_task"]
    assert "added" in runtime.gen.states
