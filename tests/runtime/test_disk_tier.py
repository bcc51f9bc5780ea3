"""The disk tier: files round-trip through both I/O paths, every damage is a clear error, training with
layers' states on disk matches the reference loop and resumes exactly, and the planner uses the disk only
when RAM is short."""

import errno
import json
import os
import shutil

import pytest
import torch

from slideformer.models import PRESETS, RandomWeights
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.memory import padded
from slideformer.runtime import AdamWConfig, Engine
from slideformer.runtime.disk import DiskTier, TierError, kvikio_available

IO_PATHS = ["posix"] + (["kvikio"] if kvikio_available() else [])
NBYTES = 40 * 2**20 + 12  # three pieces, the last one short and unaligned before padding


def aligned(nbytes: int, fill: int | None = None) -> torch.Tensor:
    raw = torch.empty(padded(nbytes) + 4096, dtype=torch.uint8)
    buf = raw[-raw.data_ptr() % 4096 :][: padded(nbytes)]
    if fill is None:
        return buf.copy_(
            torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        )
    return buf.fill_(fill)


@pytest.fixture(params=IO_PATHS)
def tier(request, tmp_path):
    t = DiskTier(tmp_path / "tier", {"unit7": NBYTES}, io=request.param)
    yield t
    t.close()


def test_round_trip(tier):
    data, back = aligned(NBYTES), aligned(NBYTES, 0)
    tier.write("unit7", data)
    tier.read("unit7", back)
    assert torch.equal(back[:NBYTES], data[:NBYTES])


def test_flipped_byte_is_a_checksum_error(tier):
    tier.write("unit7", aligned(NBYTES))
    with open(tier.path("unit7"), "r+b") as f:
        f.seek(20 * 2**20 + 5)
        byte = f.read(1)
        f.seek(20 * 2**20 + 5)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(TierError, match=r"unit7.bin: checksum mismatch in bytes \[16777216, 33554432\)"):
        tier.read("unit7", aligned(NBYTES, 0))


def test_truncated_missing_and_stale_files_are_named(tier):
    tier.write("unit7", aligned(NBYTES))
    os.truncate(tier.path("unit7"), 2**20)
    with pytest.raises(TierError, match="unit7.bin is truncated"):
        tier.read("unit7", aligned(NBYTES, 0))
    tier.write("unit7", aligned(NBYTES))
    record = json.loads((tier.dir / "unit7.json").read_text())
    tier.write("unit7", aligned(NBYTES))
    (tier.dir / "unit7.json").write_text(json.dumps(record))  # an older write's sidecar
    with pytest.raises(TierError, match="does not belong to this run's latest write of unit7"):
        tier.read("unit7", aligned(NBYTES, 0))
    (tier.dir / "unit7.json").unlink()
    with pytest.raises(TierError, match="unit7.json is missing"):
        tier.read("unit7", aligned(NBYTES, 0))


def test_directory_in_use_by_another_run_is_refused(tier):
    with pytest.raises(TierError, match="in use by another run"):
        DiskTier(tier.dir, {"unit1": 4096}, io="posix")


def test_too_little_free_space_is_refused_with_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 * 2**30, 99 * 2**30, 2**30))
    with pytest.raises(TierError, match=r"needs 2\.0 GiB in .*only 1\.0 GiB are free"):
        DiskTier(tmp_path, {"unit1": 2**30, "unit2": 2**30}, io="posix")


def test_full_disk_during_a_write_is_a_clear_error(tmp_path, monkeypatch):
    t = DiskTier(tmp_path, {"unit1": NBYTES}, io="posix")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TierError, match="writing .*unit1.bin failed: the disk is full"):
        t.write("unit1", aligned(NBYTES))
    t.close()


def test_a_file_that_is_not_a_directory_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TierError, match="cannot create it"):
        DiskTier(tmp_path / "f" / "tier", {"unit1": 4096})


def test_disk_plan_without_a_directory_is_refused():
    cfg = PRESETS["tiny-llama"]
    plan = uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu", disk_layers=2)
    with pytest.raises(ValueError, match="give a disk directory"):
        Engine(cfg, plan, RandomWeights(cfg))


@pytest.mark.parametrize(
    "update, activation, ring",
    [
        ("during_backward", "offload", 2),
        ("after_norm", "offload", 2),
        ("during_backward", "disk", 1),
        ("after_norm", "disk", 2),
    ],
)
def test_training_with_states_and_activations_on_disk_matches_the_reference_loop(
    update, activation, ring, device, tmp_path
):
    from tests.reference import B, S, assert_trains_like_reference, batches

    cfg = PRESETS["tiny-llama"]
    data = batches(cfg.vocab_size)
    src, optim = RandomWeights(cfg, seed=3), AdamWConfig(lr=1e-3, weight_decay=0.01)
    plan = uniform_plan(
        "tiny-llama",
        cfg.num_layers,
        B,
        S,
        chunk=2,
        device=device,
        disk_layers=3,
        update=update,
        activation=activation,
        disk_ring=ring,
    )
    engine = Engine(cfg, plan, src, optim, disk_dir=tmp_path)
    losses = [engine.train_step(ids, labels).loss for ids, labels in data]
    ours = engine.hf_state()
    acts = [f"act{lay}.bin" for lay in range(cfg.num_layers)] if activation == "disk" else []
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == sorted(["unit2.bin", "unit3.bin", "unit4.bin", *acts])
    engine.close()
    assert not list(tmp_path.iterdir())  # scratch files removed
    assert_trains_like_reference(cfg, src, data, optim, 2, device, None, losses, ours)


def test_checkpoint_of_disk_states_resumes_bit_exactly(tmp_path):
    from safetensors import safe_open

    from slideformer.checkpoint import STATE_FILE, write_safetensors
    from tests.reference import B, S, batches

    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"]
    data = batches(cfg.vocab_size)
    src, optim = RandomWeights(cfg, seed=3), AdamWConfig(lr=1e-3)
    plan = uniform_plan("tiny-llama", cfg.num_layers, B, S, device="cpu", disk_layers=2)
    first = Engine(cfg, plan, src, optim, disk_dir=tmp_path / "a")
    for ids, labels in data[:2]:
        first.train_step(ids, labels)
    write_safetensors(tmp_path / STATE_FILE, first.training_state().items())
    straight = [first.train_step(ids, labels).loss for ids, labels in data[2:]]
    first.close()
    resumed = Engine(cfg, plan, RandomWeights(cfg, seed=99), optim, disk_dir=tmp_path / "b")
    with safe_open(tmp_path / STATE_FILE, "pt") as f:
        resumed.load_training_state(f.get_tensor, set(f.keys()))
    again = [resumed.train_step(ids, labels).loss for ids, labels in data[2:]]
    resumed.close()
    assert again == straight
