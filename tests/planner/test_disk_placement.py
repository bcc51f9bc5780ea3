"""The planner puts layers' states on disk only when RAM is short, and within the disk budget."""


def test_planner_puts_states_on_disk_only_when_ram_is_short():
    from slideformer.schedule.profile import Profile
    from slideformer.schedule.memory import GiB, disk_bytes
    from slideformer.planner.search import Budgets, candidates, choose_plan
    from slideformer.models import load_model_config

    profile, cfg = Profile.load("h100-80gb"), load_model_config("qwen3-14b")
    without = choose_plan(cfg, "qwen3-14b", 2048, 8, profile, Budgets(72 * GiB, 110 * GiB))
    assert not without.fits and "host RAM needs at least" in without.shortfalls[0]
    with_disk = choose_plan(cfg, "qwen3-14b", 2048, 8, profile, Budgets(72 * GiB, 110 * GiB, 60 * GiB))
    assert with_disk.fits and with_disk.plan.disk_units
    assert disk_bytes(cfg, with_disk.plan) <= 60 * GiB
    sim = with_disk.simulation
    assert sim.utilisation["disk"] > 0.5 and sim.host_memory_bytes <= 110 * GiB
    # with RAM to spare, no plan the search chooses from (choose_plan scores these) keeps states on disk
    roomy = candidates(cfg, "qwen3-14b", 2048, 8, profile, Budgets(72 * GiB, 400 * GiB, 60 * GiB), "during_backward")
    assert roomy and not any(p.disk_units for p in roomy)
