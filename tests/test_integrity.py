"""A checkpoint whose bytes changed, that is not stored as torch.save stores it, or whose contents are not what a
fit of the same configuration writes, is refused by every reader that would use it, in one line naming what is
wrong, and nothing is unpacked, loaded, deleted or written; an output path that is not a regular file is refused
and left as it was. Real checkpoints from real fits, damaged or rewritten on disk; real commands, in-process and as
processes; real symbolic links, FIFOs, directories and devices."""

import io
import math
import os
import re
import reprlib
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DEFAULT, TINY, copied_run, crafted_checkpoint, error_of, fitted_checkpoint, last
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from dynnet.cli import main
from dynnet.cli.predictions import check_output_path, export_main
from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import CheckpointError, load_checkpoint
from dynnet.runs.checkpoint_state import check_training_state
from dynnet.runs.files import write_atomically

RESUME = ["-c", DEFAULT, *TINY, "--trainer.max_steps", "400"]  # the trained run's settings, with steps to train
# An Adam run with a schedule, for what only such a run holds: Adam's per-parameter step, a scheduler's state.
ADAM = ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.05", "--lr_scheduler", "CosineAnnealingLR",
        "--lr_scheduler.T_max", "400"]  # fmt: skip


@pytest.fixture(scope="module")
def trained_adam_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt (step 200) of the trained_checkpoint's fit with ADAM's optimizer and schedule."""
    return fitted_checkpoint(tmp_path_factory.mktemp("trained_adam"), *ADAM)


@pytest.fixture
def copied_checkpoint(trained_checkpoint, tmp_path) -> Path:
    """The trained run copied to tmp_path/root: its last.ckpt, to damage or rewrite."""
    return copied_run(trained_checkpoint, tmp_path / "root")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def record_start(data: bytes, name: str) -> int:
    """Where a zip record's bytes begin: after its local header (30 bytes, then its name and extra field, whose
    lengths the header holds at offsets 26 and 28)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name))
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def central_entry(data: bytes, name: str) -> int:
    """Where the zip's central directory describes the record whose name ends with name (its name follows the
    entry's 46 fixed bytes)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        full = next(n for n in archive.namelist() if n.endswith(name)).encode()
        entry = data.index(b"PK\x01\x02", archive.start_dir)
    while not data[entry + 46 :].startswith(full):
        entry = data.index(b"PK\x01\x02", entry + 4)
    return entry


def tensor_record(path: Path, parameter: str) -> str:
    """The zip record holding a parameter's value: the data/N record whose sign bit, flipped, changes it."""
    original = torch.load(path, weights_only=True)["state_dict"][parameter]
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        names = [n.split("/", 1)[1] for n in archive.namelist() if "/data/" in n and "/.data/" not in n]
    for name in names:
        changed = bytearray(data)
        changed[record_start(data, name) + 3] ^= 0x80  # the sign bit of a little-endian float32
        loaded = torch.load(io.BytesIO(bytes(changed)), weights_only=True)["state_dict"][parameter]
        if loaded == -original:
            return name
    raise AssertionError(f"no record holds {parameter}")


def flip_in_tensor(path: Path):
    """Flip the lowest bit of model.shared's float32 in its data record: a different number, the same size.
    Returns what the flip changes, read from a loaded checkpoint."""
    data = bytearray(path.read_bytes())
    data[record_start(bytes(data), tensor_record(path, "model.shared"))] ^= 0x01
    path.write_bytes(data)
    return lambda checkpoint: checkpoint["state_dict"]["model.shared"].item()


def flip_in_pickle(path: Path):
    """Flip the lowest bit of the first float64 pi (the data range's upper bound, pickled big-endian) in data.pkl.
    Returns what the flip changes, read from a loaded checkpoint."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack(">d", math.pi), record_start(bytes(data), "data.pkl"))
    data[at + 7] ^= 0x01
    path.write_bytes(data)
    return lambda checkpoint: (
        checkpoint["datamodule_hyper_parameters"]["high"],
        checkpoint["run_settings"]["data"]["high"],
    )


def readers_errors(checkpoint, tmp_path, capsys) -> dict[str, str]:
    """What each command that reads checkpoints (a resumed fit, validate, test, predict, dynnet-export) says of
    checkpoint: its one error line, after the command's prefix, by command."""
    errors = {}
    for args in (
        ["fit", *RESUME, "--ckpt_path", str(checkpoint)],
        ["validate", "--ckpt_path", str(checkpoint)],
        ["test", "--ckpt_path", str(checkpoint)],
        ["predict", "--ckpt_path", str(checkpoint), "--predictions.path", str(tmp_path / "p.csv")],
    ):
        error = error_of([*args, "--trainer.default_root_dir", str(tmp_path / "root")], capsys)
        assert error.startswith("dynnet: error: ") and "\n" not in error, error
        errors[args[0]] = error.removeprefix("dynnet: error: ")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoint), "-o", str(tmp_path / "polynomial.json")])
    assert str(exit_info.value.code).startswith("dynnet-export: error: ")
    errors["dynnet-export"] = str(exit_info.value.code).removeprefix("dynnet-export: error: ")
    return errors


def peak(*args: str) -> tuple[int, str, int]:
    """Run `dynnet ARGS` as a process: its exit code, its stderr, and its peak resident memory in MiB (the
    kernel's count for that process alone)."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen([sys.executable, "-m", "dynnet", *args], stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        return process.returncode, stderr.read().decode(), usage.ru_maxrss // 1024


# ------------------------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("flip", [flip_in_tensor, flip_in_pickle], ids=["tensor-data", "data.pkl"])
def test_one_flipped_bit_is_refused_by_every_reader(copied_checkpoint, tmp_path, capsys, flip):
    checkpoint = copied_checkpoint
    original = torch.load(checkpoint, weights_only=True)
    changed_value = flip(checkpoint)
    # torch alone reads the changed file without complaint, and gets a different number
    assert changed_value(torch.load(checkpoint, weights_only=True)) != changed_value(original)
    before = snapshot(tmp_path)
    damaged = f"checkpoint {checkpoint} is damaged: its bytes changed after it was written (Bad CRC-32 for file "
    for reader, error in readers_errors(checkpoint, tmp_path, capsys).items():
        assert error.startswith(damaged), reader
    with pytest.raises(CheckpointError, match="its bytes changed after it was written"):
        DynamicNet.load_from_checkpoint(checkpoint)
    assert snapshot(tmp_path) == before  # nothing written: no run, no predictions, no JSON, no lock left


@pytest.mark.slow
def test_dynnet_export_refuses_a_flipped_bit_as_a_process(copied_checkpoint, tmp_path):
    flip_in_tensor(copied_checkpoint)
    output = tmp_path / "polynomial.json"
    done = subprocess.run(
        [sys.executable, "-c", "from dynnet.cli.predictions import export_main; export_main()",
         str(copied_checkpoint), "-o", str(output)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"dynnet-export: error: checkpoint {copied_checkpoint} is damaged")
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert not output.exists()


def test_every_record_of_a_written_checkpoint_carries_a_real_crc32(trained_checkpoint):
    with zipfile.ZipFile(trained_checkpoint) as archive:
        assert archive.testzip() is None
        assert all(i.CRC != 0 for i in archive.infolist() if i.file_size > 0)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())  # what the reader demands


def test_a_record_marked_as_a_directory_is_refused(copied_checkpoint):
    """One bit of a record's attributes in the zip's central directory: torch's reader then takes the tensor's
    record for an empty directory and the tensor for whatever memory it got; the CRC-32 still matches."""
    data = bytearray(copied_checkpoint.read_bytes())
    name = tensor_record(copied_checkpoint, "model.shared")
    data[central_entry(bytes(data), name) + 38] |= 0x10  # the external attributes' MS-DOS directory bit
    copied_checkpoint.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"is damaged: .*record archive/{name} is marked as a directory"):
        load_checkpoint(copied_checkpoint)


def declare(data: bytearray, name: str, stored: int | None = None, unpacked: int | None = None) -> None:
    """Set the sizes the central directory gives for a record (at offsets 20 and 24 of its entry), and the local
    header's copies (at 18 and 22)."""
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = next(i for i in archive.infolist() if i.filename.endswith(name)).header_offset
    entry = central_entry(bytes(data), name)
    for size, offsets in ((stored, (entry + 20, local + 18)), (unpacked, (entry + 24, local + 22))):
        for offset in offsets if size is not None else ():
            struct.pack_into("<I", data, offset, size)


def central_entry_offset(data: bytearray, name: str) -> int:
    """The local header offset the central directory gives for a record (at offset 42 of its entry)."""
    return struct.unpack_from("<I", data, central_entry(bytes(data), name) + 42)[0]


RECORDS = {
    # The CRC-32 covers what a reader reads; a reader that trusts the other size reads more, or less, than it.
    "declared-below-stored": (lambda d: declare(d, "data.pkl", unpacked=16), "declares 16 bytes and stores"),
    "running-past-the-records": (
        lambda d: declare(d, "data.pkl", stored=len(d), unpacked=len(d)),
        "overlaps another or lies outside the records",
    ),
    "two-records-over-one": (  # data/1 read from data/0's bytes: one record's bytes taken twice
        lambda d: struct.pack_into("<I", d, central_entry(bytes(d), "data/1") + 42, central_entry_offset(d, "data/0")),
        "overlaps another or lies outside the records",
    ),
}


@pytest.mark.parametrize("change, reason", RECORDS.values(), ids=RECORDS.keys())
def test_records_that_torch_save_could_not_have_written_are_refused(copied_checkpoint, change, reason):
    data = bytearray(copied_checkpoint.read_bytes())
    change(data)
    copied_checkpoint.write_bytes(data)
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(copied_checkpoint)
    assert str(refusal.value).startswith(
        f"checkpoint {copied_checkpoint} is damaged: its bytes changed after it was written"
    )
    assert reason in str(refusal.value)


def compressed(checkpoint: Path, path: Path, method: int, unpacked_mib: int, declared: int | None = None) -> Path:
    """checkpoint rewritten with its data.pkl replaced by unpacked_mib MiB of zeros compressed with method (streamed
    in, never held whole), declaring another unpacked size if given. Returns path."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(checkpoint) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            if info.filename.endswith("data.pkl"):
                bomb = zipfile.ZipInfo(info.filename)
                bomb.compress_type = method
                with archive.open(bomb, "w") as record:
                    for _ in range(unpacked_mib):
                        record.write(chunk)
            else:
                archive.writestr(info, source.read(info))
    if declared is not None:
        data = bytearray(path.read_bytes())
        declare(data, "data.pkl", unpacked=declared)
        path.write_bytes(data)
    assert path.stat().st_size < 1 << 20  # small enough to pass the size check: only the records can refuse it
    return path


@pytest.mark.slow
def test_compressed_records_are_refused_before_anything_is_unpacked(copied_checkpoint, tmp_path):
    """The issue's two: a deflated record that unpacks to 512 MiB, and a bzip2 one that unpacks to 256 MiB while
    declaring 16 bytes. `dynnet validate` refuses each in one line, at the memory of a refusal of a file that
    unpacks to nothing: a damaged one."""
    bombs = {
        "deflate": compressed(copied_checkpoint, tmp_path / "deflate.ckpt", zipfile.ZIP_DEFLATED, 512),
        "bzip2": compressed(copied_checkpoint, tmp_path / "bzip2.ckpt", zipfile.ZIP_BZIP2, 256, declared=16),
    }
    flip_in_tensor(copied_checkpoint)
    code, error, baseline = peak(
        "validate", "--ckpt_path", str(copied_checkpoint), "--trainer.default_root_dir", str(tmp_path)
    )
    assert code == 1 and "is damaged" in error
    for method, bomb in bombs.items():
        code, error, used = peak("validate", "--ckpt_path", str(bomb), "--trainer.default_root_dir", str(tmp_path))
        declared = 16 if method == "bzip2" else 512 << 20
        assert code == 1 and error == (
            f"dynnet: error: checkpoint {bomb} was refused: it unpacks to {declared} bytes, it says, from a record "
            f"compressed with {method} (archive/data.pkl); torch.save compresses none\n"
        )
        assert used < baseline + 64, (method, used, baseline)  # unpacking alone would add 256 MiB or more


def same(a, b) -> bool:
    """Whether two loaded checkpoints hold the same values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.slow
def test_no_flipped_bit_anywhere_changes_what_loads(trained_checkpoint, tmp_path):
    """Each byte of a real checkpoint, one bit flipped (bit = position mod 8): load_checkpoint refuses the file
    in one line or returns exactly the original contents (a flip in bytes no reader uses: padding, the local
    headers' copies of the CRC and the time)."""
    original_path = trained_checkpoint
    original, data = load_checkpoint(original_path), original_path.read_bytes()
    path = tmp_path / "flipped.ckpt"
    refused = unchanged = 0
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        path.write_bytes(flipped)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as err:
            assert "\n" not in str(err)
            refused += 1
            continue
        assert same(loaded, original), f"a flipped bit at byte {position} changed what loads"
        unchanged += 1
    assert refused > len(data) // 2, (refused, unchanged)  # most bytes are what the records hold


# ----------------------------------------------------------------------------------------- what every reader uses


def word(index: int, value) -> Callable:
    """A change that sets one of the degree generator's state words."""

    def change(checkpoint: dict) -> None:
        version, words, gauss = checkpoint["degree_generator"]
        checkpoint["degree_generator"] = (version, (*words[:index], value, *words[index + 1 :]), gauss)

    return change


GENERATOR = "is malformed: degree_generator is not a random generator's state"
# Refused by every reader: all read through load_checkpoint, which the flipped bits above reach too. Before, the
# generator's words crashed all five readers (TypeError, OverflowError) when random.Random.setstate met them.
EVERY_READER = {
    "nan-weight": (
        lambda c: c["state_dict"].update({"model.shared": torch.tensor(float("nan"))}),
        "was refused: parameter model.shared is nan, not a finite number",
    ),
    "negative-and-huge-counts": (
        lambda c: c.update(degree_counts=[-5, 1e30, 0]),
        "was refused: degree_counts[0] is -5, not a whole number of draws",
    ),
    "generator-word-string": (word(5, "7"), f"{GENERATOR} (word 5 is '7', not a whole number from 0 to 2**32 - 1)"),
    "generator-word-2**64": (
        word(0, 2**64),
        f"{GENERATOR} (word 0 is {2**64}, not a whole number from 0 to 2**32 - 1)",
    ),
}
CONTENTS = {
    "inf-weight": (
        lambda c: c["state_dict"].update({"model.coefficients.1": torch.tensor(float("-inf"))}),
        "was refused: parameter model.coefficients.1 is -inf, not a finite number",
    ),
    "float-count": (
        lambda c: c.update(degree_counts=[5, 1e30, 0]),
        "was refused: degree_counts[1] is 1e+30, not a whole number of draws",
    ),
    "bool-count": (
        lambda c: c.update(degree_counts=[True, 0, 0]),
        "was refused: degree_counts[0] is True, not a whole number of draws",
    ),
    "counts-past-2**53": (
        lambda c: c.update(degree_counts=[2**52, 2**52, 0]),
        "was refused: degree_counts add up to 2**53 draws or more",
    ),
    "two-counts-for-three-degrees": (
        lambda c: c.update(degree_counts=[1, 2]),
        "was refused: degree_counts should be 3 counts, one per degree",
    ),
    "generator-version": (
        lambda c: c.update(degree_generator=(2, *c["degree_generator"][1:])),
        f"{GENERATOR} (its version is 2, not 3)",
    ),
    "generator-bool-word": (word(3, True), f"{GENERATOR} (word 3 is True, not a whole number from 0 to 2**32 - 1)"),
    "generator-position-past-624": (
        word(624, 625),
        f"{GENERATOR} (its position is 625, not a whole number from 0 to 624)",
    ),
    "generator-short": (
        lambda c: c.update(degree_generator=(3, c["degree_generator"][1][:624], None)),
        f"{GENERATOR} (it should hold 625 numbers)",
    ),
    "generator-gauss-string": (
        lambda c: c.update(degree_generator=(*c["degree_generator"][:2], "0.5")),
        f"{GENERATOR} (gauss's next value is '0.5', not None or a finite number)",
    ),
    "lightning-version": (  # Lightning parses it, and restructures an older checkpoint, before any hook runs
        lambda c: c.update({"pytorch-lightning_version": "two"}),
        "is malformed: its pytorch-lightning_version is 'two', not Lightning 2.0.0 or later",
    ),
    "callbacks-not-a-mapping": (
        lambda c: c.update(callbacks=["Run"]),
        "is malformed: callbacks should map each callback to its state",
    ),
}


@pytest.mark.parametrize("change, reason", EVERY_READER.values(), ids=EVERY_READER.keys())
def test_implausible_contents_are_refused_by_every_reader(copied_checkpoint, tmp_path, capsys, change, reason):
    checkpoint = crafted_checkpoint(copied_checkpoint, change)
    before = snapshot(tmp_path)
    for reader, error in readers_errors(checkpoint, tmp_path, capsys).items():
        assert error == f"checkpoint {checkpoint} {reason}", reader
    with pytest.raises(CheckpointError) as refusal:
        DynamicNet.load_from_checkpoint(checkpoint)
    assert str(refusal.value) == f"checkpoint {checkpoint} {reason}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("change, reason", CONTENTS.values(), ids=CONTENTS.keys())
def test_implausible_contents_are_refused(copied_checkpoint, change, reason):
    checkpoint = crafted_checkpoint(copied_checkpoint, change)
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(checkpoint)
    assert str(refusal.value) == f"checkpoint {checkpoint} {reason}"


def nested(checkpoint: Path, depth: int) -> Path:
    """checkpoint with a list nested depth deep among the Run's schedule arguments. torch.save's pickler cannot
    write one (it recurses), so the list's opcodes replace a one-string list's in data.pkl: depth EMPTY_LISTs,
    then APPENDs that put each into the one before it."""
    crafted_checkpoint(checkpoint, lambda c: c["callbacks"]["Run"]["lr_scheduler_args"].update(milestones=["DEEP"]))
    with zipfile.ZipFile(checkpoint) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    one = re.compile(rb"\](?:q.|r.{4})X\x04\x00\x00\x00DEEP(?:q.|r.{4})a", re.DOTALL)  # memo puts between
    records[name], count = one.subn(b"]" * depth + b"a" * (depth - 1), records[name])
    assert count == 1
    with zipfile.ZipFile(checkpoint, "w") as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    loaded = torch.load(checkpoint, weights_only=True)["callbacks"]["Run"]["lr_scheduler_args"]["milestones"]
    for _ in range(depth - 1):
        (loaded,) = loaded
    assert loaded == []
    return checkpoint


def test_lists_nested_without_end_are_refused_by_every_reader(copied_checkpoint, tmp_path, capsys):
    """10**5 deep: deepcopy (a resume's callback states) and every comparison would exceed Python's recursion limit;
    torch's unpickler builds it without recursing, and load_checkpoint measures it without recursing."""
    checkpoint = nested(copied_checkpoint, 10**5)
    before = snapshot(tmp_path)
    reason = "was refused: it nests lists or mappings more than 32 deep"
    for reader, error in readers_errors(checkpoint, tmp_path, capsys).items():
        assert error == f"checkpoint {checkpoint} {reason}", reader
    assert snapshot(tmp_path) == before


def test_plausible_contents_load(copied_checkpoint):
    """Degree counts beyond global_step (a model trained by fits on two Trainers has drawn more), and a generator
    state whose gauss value was drawn, are what a checkpoint may hold."""

    def change(checkpoint: dict) -> None:
        checkpoint["degree_counts"] = [10**6, 2**52 - 1, 0]
        checkpoint["degree_generator"] = (*checkpoint["degree_generator"][:2], -0.25)

    checkpoint = load_checkpoint(crafted_checkpoint(copied_checkpoint, change))
    assert checkpoint["degree_counts"] == [10**6, 2**52 - 1, 0] and checkpoint["global_step"] == 200


def test_strict_false_accepts_a_partial_state_dict_but_still_checks_what_it_holds(copied_checkpoint):
    path = crafted_checkpoint(copied_checkpoint, lambda c: c["state_dict"].pop("model.coefficients.0"))
    with pytest.raises(CheckpointError, match="its state_dict should hold exactly"):
        load_checkpoint(path)
    assert "model.coefficients.0" not in load_checkpoint(path, strict=False)["state_dict"]
    crafted_checkpoint(
        copied_checkpoint, lambda c: c["state_dict"].update({"model.shared": torch.tensor(float("nan"))})
    )
    with pytest.raises(CheckpointError, match="parameter model.shared is nan"):
        load_checkpoint(path, strict=False)


# ---------------------------------------------------------------------------------------------- what a fit writes


def resumed_error(checkpoint: Path, capsys, *args: str) -> str:
    """The one line a fit resumed from checkpoint (in its run) with args exits with, after the command's prefix;
    checks that the run's checkpoints are left as they were and that the run went no further than its start (its
    config for the resumed step is written when training starts)."""
    checkpoints = snapshot(checkpoint.parent)
    root = checkpoint.parents[3]
    error = error_of(["fit", *args, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(root)], capsys)
    assert error.startswith("dynnet: error: ") and "\n" not in error, error
    assert snapshot(checkpoint.parent) == checkpoints
    assert not list(checkpoint.parents[1].glob("config-step*.yaml"))
    return error.removeprefix("dynnet: error: ")


def loop_steps(checkpoint: dict) -> dict:
    """The fit loop's count of optimizer steps, where Lightning's global_step comes from under manual
    optimization."""
    return checkpoint["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]["total"]


def set_state(name: str, value) -> Callable:
    """A change that sets one per-parameter optimizer state entry of parameter 0."""
    return lambda c: c["optimizer_states"][0]["state"][0].update({name: value})


def set_group(name: str, value) -> Callable:
    """A change that sets one setting of the optimizer's parameter group."""
    return lambda c: c["optimizer_states"][0]["param_groups"][0].update({name: value})


def early_stopping(best_score) -> Callable:
    """A change that adds an EarlyStopping state, as the resume's EarlyStopping would take it."""
    callback = EarlyStopping(monitor="val/expected_loss")
    state = callback.state_dict() | {"best_score": best_score}
    return lambda c: c["callbacks"].update({callback.state_key: state})


STOPPING = ["--trainer.callbacks+", '{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss"}}']
GROUP = "optimizer_states[0]['param_groups'][0]"
STATE = "optimizer_states[0]['state'][0]"
STEPS = "loops['fit_loop']['epoch_loop.manual_optimization.optim_step_progress']['total']['completed']"
# Each crafted with valid CRC-32s, each refused by a resumed fit only: the other readers use none of it. Before,
# each ended in a traceback, trained differently without a word, or blamed the learning rate.
RESUMES = {
    "loop-state-a-string": (
        "sgd", [], lambda c: c["loops"].update(fit_loop="x"),
        "its loops['fit_loop'] is 'x', where this configuration has a mapping",
    ),
    "negative-step-count": (  # trained 350 steps while printing "Resumed ... at step 200"
        "sgd", [], lambda c: loop_steps(c).update(completed=-150),
        f"its {STEPS} is -150, where this configuration has a whole number of at least 0",
    ),
    "step-counts-disagree": (
        "sgd", [], lambda c: loop_steps(c).update(completed=350),
        "its loops count 350 optimizer steps, and its global_step says 200",
    ),
    "callback-state-a-string": (
        "sgd", [], lambda c: c["callbacks"].update(Run="x"),
        "its callbacks['Run'] is 'x', where this configuration has a mapping",
    ),
    "early-stopping-score-a-string": (
        "sgd", STOPPING, early_stopping("low"),
        "its callbacks['EarlyStopping']['best_score'] is 'low', where this configuration has a float32 tensor of "
        "shape ()",
    ),
    "run-score-a-string": (
        "sgd", [], lambda c: c["callbacks"]["Run"].update(best_score="low"),
        "its run state's best_score is 'low', not a finite number",
    ),
    "string-lr": (
        "sgd", [], set_group("lr", "0.01"),
        f"its {GROUP}['lr'] is '0.01', where this configuration has a number",
    ),
    "negative-lr": (  # trained uphill, then blamed the learning rate's size
        "sgd", [], set_group("lr", -1e-8),
        f"its {GROUP}['lr'] is -1e-08, below 0",
    ),
    "integer-lr-past-float": (
        "sgd", [], set_group("lr", 2**2000),
        f"its {GROUP}['lr'] is {reprlib.repr(2**2000)}, not a finite number",
    ),
    "string-flag": (
        "sgd", [], set_group("nesterov", "False"),
        f"its {GROUP}['nesterov'] is 'False', where this configuration has False",
    ),
    "recorded-lr-past-float": (  # what a resume compares and applies from the resumed step
        "sgd", [], lambda c: c["run_settings"]["optimizer_args"].update(lr=2**2000),
        f"its run_settings['optimizer_args']['lr'] is {reprlib.repr(2**2000)}, not a finite number",
    ),
    "duplicate-parameter-indices": (  # torch pairs states with parameters by position: momentum went elsewhere
        "sgd", [], set_group("params", [0, 0, 1, 2, 3]),
        f"its {GROUP}['params'] is [0, 0, 1, 2, 3], where this optimizer's are [0, 1, 2, 3, 4]",
    ),
    "nan-momentum-buffer": (  # blamed on the learning rate when the loss became nan
        "sgd", [], set_state("momentum_buffer", torch.tensor(float("nan"))),
        f"its {STATE}['momentum_buffer'] is nan (a float32 tensor of shape ()), not a finite number",
    ),
    "momentum-buffer-of-another-shape": (
        "sgd", [], set_state("momentum_buffer", torch.zeros(3)),
        f"its {STATE}['momentum_buffer'] is a float32 tensor of shape (3,), where this configuration has a float32 "
        "tensor of shape ()",
    ),
    "momentum-buffer-a-string": (
        "sgd", [], set_state("momentum_buffer", "0"),
        f"its {STATE}['momentum_buffer'] is '0', where this configuration has a float32 tensor of shape ()",
    ),
    "state-for-a-parameter-it-lacks": (
        "sgd", [], lambda c: c["optimizer_states"][0]["state"].update({7: {}}),
        "its optimizer_states[0]['state'] holds 7, which this optimizer does not",
    ),
    "optimizer-states-not-a-list": (
        "sgd", [], lambda c: c.update(optimizer_states={"lr": 1}),
        "its optimizer_states should be a list of 1 optimizer states, as this fit has",
    ),
    "no-optimizer-state": (  # Lightning would resume the optimizer from scratch
        "sgd", [], lambda c: c.update(optimizer_states=[]),
        "its optimizer_states should be a list of 1 optimizer states, as this fit has",
    ),
    "param-groups-missing": (
        "sgd", [], lambda c: c["optimizer_states"][0].pop("param_groups"),
        "its optimizer_states[0] should hold an optimizer's state and param_groups",
    ),
    "state-not-a-mapping": (
        "sgd", [], lambda c: c["optimizer_states"][0].update(state=[1, 2]),
        "its optimizer_states[0]['state'] is a list, where this configuration has a mapping",
    ),
    "schedulers-not-a-list": (
        "sgd", [], lambda c: c.update(lr_schedulers="none"),
        "its lr_schedulers is 'none', where this configuration has a list",
    ),
    "sgd-state-in-an-adam-run": (
        "adam", ADAM, lambda c: c["optimizer_states"][0].update(
            state={i: {"momentum_buffer": torch.tensor(0.0)} for i in range(5)}
        ),
        f"its {STATE} holds 'momentum_buffer', which this configuration does not write",
    ),
    "negative-adam-step": (  # Adam divides by 1 - beta ** step: the parameters became nan
        "adam", ADAM, set_state("step", torch.tensor(-5.0)),
        f"its {STATE}['step'] is -5.0 (a float32 tensor of shape ()), where this configuration has a number of at "
        "least 0",
    ),
    "scheduler-T_max-0": (  # CosineAnnealingLR divides by it
        "adam", ADAM, lambda c: c["lr_schedulers"][0].update(T_max=0),
        "its lr_schedulers[0]['T_max'] is 0, where this configuration has a whole number of at least 1",
    ),
}  # fmt: skip


@pytest.mark.parametrize("run, args, change, reason", RESUMES.values(), ids=RESUMES.keys())
def test_a_resume_is_refused_unless_its_state_is_what_the_fit_writes(
    request, tmp_path, capsys, run, args, change, reason
):
    trained = request.getfixturevalue({"sgd": "trained_checkpoint", "adam": "trained_adam_checkpoint"}[run])
    checkpoint = crafted_checkpoint(copied_run(trained, tmp_path / "root"), change)
    assert resumed_error(checkpoint, capsys, *RESUME, *args) == f"checkpoint {checkpoint} was refused: {reason}"


def test_evaluation_reads_what_it_uses_and_no_more(copied_checkpoint, tmp_path, capsys):
    """validate and dynnet-export use the model, not the optimizer: a checkpoint a resume refuses for its optimizer
    state still evaluates and exports."""
    crafted_checkpoint(copied_checkpoint, set_group("lr", "0.01"))
    main(["validate", "--ckpt_path", str(copied_checkpoint), "--trainer.default_root_dir", str(tmp_path)])
    assert f"Checkpoint: {copied_checkpoint} at step 200" in capsys.readouterr().out
    export_main([str(copied_checkpoint), "-o", str(tmp_path / "polynomial.json")])
    assert (tmp_path / "polynomial.json").read_text().startswith("{")


# ----------------------------------------------------------------------------------------------- callbacks' files


ABSENT = object()  # a field a state lacks


def model_checkpoint_state(run: Path, **fields) -> Callable:
    """A change that adds the state a resume's `--trainer.callbacks+=ModelCheckpoint` takes, with fields set."""
    callback = ModelCheckpoint()
    state = callback.state_dict() | {"dirpath": str(run / "checkpoints")} | fields
    state = {field: value for field, value in state.items() if value is not ABSENT}
    return lambda c: c["callbacks"].update({callback.state_key: state})


def linked(run: Path) -> dict:
    """A best file inside the run's checkpoints folder that is a symbolic link to the victim beside the run."""
    link = run / "checkpoints" / "epoch=0-step=100.ckpt"
    link.symlink_to(run.parents[2] / "victim.txt")
    return {"best_model_path": str(link)}


FILES = {
    # The issue's: no dirpath, and a path through "..": Lightning deleted victim.txt at the first save.
    "no-dirpath": (
        lambda run: {"best_model_path": f"{run}/checkpoints/../../../../victim.txt", "dirpath": ABSENT},
        "its callbacks['ModelCheckpoint'] lacks 'dirpath'",
    ),
    "dot-dot": (
        lambda run: {"best_model_path": f"{run}/checkpoints/../../../../victim.txt"},
        "its ModelCheckpoint state names '{run}/checkpoints/../../../../victim.txt', outside the run",
    ),
    "symbolic-link": (
        linked,
        "its ModelCheckpoint state names '{run}/checkpoints/epoch=0-step=100.ckpt', outside the run",
    ),
    "relative": (
        lambda run: {"kth_best_model_path": "victim.txt", "best_k_models": {"victim.txt": torch.tensor(1.0)}},
        "its ModelCheckpoint state names 'victim.txt', outside the run",
    ),
}


@pytest.mark.parametrize("fields, reason", FILES.values(), ids=FILES.keys())
def test_a_callback_state_cannot_name_a_file_outside_the_run(
    copied_checkpoint, tmp_path, capsys, monkeypatch, fields, reason
):
    """Resumed with a ModelCheckpoint, which deletes the best file its state names when it saves a new one."""
    run = copied_checkpoint.parents[1]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    monkeypatch.chdir(tmp_path)  # where a relative path lands
    crafted_checkpoint(copied_checkpoint, model_checkpoint_state(run, **fields(run)))
    error = resumed_error(copied_checkpoint, capsys, *RESUME, "--trainer.callbacks+=ModelCheckpoint")
    assert error == f"checkpoint {copied_checkpoint} was refused: {reason.format(run=run)}"
    assert victim.read_text() == "keep me"


def test_a_callbacks_own_files_inside_the_run_are_kept(copied_checkpoint, tmp_path, capsys):
    """The same ModelCheckpoint state naming a file of the run, through '..' that stays inside it: the resume
    trains, and the callback replaces its own previous best."""
    run = copied_checkpoint.parents[1]
    previous = run / "checkpoints" / "epoch=0-step=100.ckpt"
    previous.write_bytes(b"an older best")
    crafted_checkpoint(
        copied_checkpoint,
        model_checkpoint_state(run, best_model_path=f"{run}/checkpoints/../checkpoints/{previous.name}"),
    )
    main(["fit", *RESUME, "--trainer.callbacks+=ModelCheckpoint", "--ckpt_path", str(copied_checkpoint),
          "--trainer.default_root_dir", str(run.parents[1])])  # fmt: skip
    assert load_checkpoint(copied_checkpoint)["global_step"] == 400
    assert not previous.exists()


# ----------------------------------------------------------------------------------------------- what is accepted


RESUMED = {
    # LBFGS keeps one state for all parameters, with a history that grows; max_eval given, as its default (None)
    # becomes a number in the run's recorded arguments.
    "lbfgs": ["--optimizer", "torch.optim.LBFGS", "--optimizer.lr", "0.1", "--optimizer.max_iter", "4",
              "--optimizer.max_eval", "5"],
    "nadam": ["--optimizer", "torch.optim.NAdam", "--optimizer.lr", "0.01"],  # its mu_product underflows to 0
    # A score to beat in float64, where a fresh trainer's is a float32 inf. Stopped mid-epoch: resumed at an
    # epoch's end, Lightning replays the end for EarlyStopping before any validation logged its metric.
    "early-stopping": ["--trainer.callbacks+", '{"class_path": "EarlyStopping", "init_args": {"monitor": '
                       '"val/log10_gap", "patience": 5}}', "--trainer.max_steps", "250"],
    # The run's schedule arguments: the fit's config gives four, the resumed fit's every one.
    "plateau": ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.05", "--lr_scheduler", "ReduceLROnPlateau",
                "--lr_scheduler.monitor", "val/expected_loss", "--lr_scheduler.patience", "0"],
    "float64": ["--trainer.precision", "64-true"],
}  # fmt: skip


@pytest.mark.parametrize("args", RESUMED.values(), ids=RESUMED.keys())
def test_what_fits_write_is_resumed(tmp_path, args):
    main(["fit", *TINY, *args, "--trainer.default_root_dir", str(tmp_path)])
    step = load_checkpoint(last(tmp_path))["global_step"]
    main(["fit", *TINY, *args, "--trainer.max_steps", "400", "--ckpt_path", "last",
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert load_checkpoint(last(tmp_path))["global_step"] > step


def trained_state(kind: type, schedule: bool = False) -> tuple[dict, SimpleNamespace]:
    """A checkpoint's optimizer state after three real steps on a DynamicNet's coefficients (and a OneCycleLR's,
    which adds to the parameter groups, if schedule), with a trainer holding a fresh optimizer (and scheduler) of
    the same configuration, as a resumed fit's does."""
    states = []
    options = {"momentum": 0.9} if kind is torch.optim.SGD else {}  # without, SGD keeps no state
    x = torch.linspace(-math.pi, math.pi, 100)
    for steps in (3, 0):
        module = DynamicNet()
        optimizer = kind(module.parameters(), lr=1e-4, **options)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=10) if schedule else None

        def closure(optimizer=optimizer, module=module) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.mse_loss(module(x), torch.sin(x))
            loss.backward()
            return loss

        for _ in range(steps):
            optimizer.step(closure)
            if scheduler:
                scheduler.step()
        states.append((optimizer, scheduler))
    (trained, trained_scheduler), (live, live_scheduler) = states
    checkpoint = {
        "optimizer_states": [trained.state_dict()],
        "lr_schedulers": [trained_scheduler.state_dict()] if trained_scheduler else [],
        "run_settings": {},
    }
    configs = [SimpleNamespace(scheduler=live_scheduler)] if live_scheduler else []
    return checkpoint, SimpleNamespace(optimizers=[live], lr_scheduler_configs=configs, ckpt_path="trained.ckpt")


def optimizers() -> list[type]:
    """Every optimizer in torch.optim that trains scalar parameters with dense gradients."""
    kinds = [getattr(torch.optim, name) for name in dir(torch.optim)]
    unsuited = (torch.optim.SparseAdam, torch.optim.Muon)  # sparse gradients only; matrices only
    return [k for k in kinds if isinstance(k, type) and issubclass(k, torch.optim.Optimizer) and
            k is not torch.optim.Optimizer and not issubclass(k, unsuited)]  # fmt: skip


@pytest.mark.parametrize("kind", optimizers(), ids=lambda kind: kind.__name__)
def test_every_torch_optimizers_trained_state_is_accepted(kind):
    checkpoint, trainer = trained_state(kind)
    assert checkpoint["optimizer_states"][0]["state"]  # it has stepped: there is a state to check
    check_training_state(checkpoint, trainer, {})


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam], ids=lambda kind: kind.__name__)
def test_a_schedule_that_adds_to_the_parameter_groups_is_accepted(kind):
    checkpoint, trainer = trained_state(kind, schedule=True)
    check_training_state(checkpoint, trainer, {})
    # and a tensor lr, which torch takes
    checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] = torch.tensor(1e-4)
    check_training_state(checkpoint, trainer, {})


# ------------------------------------------------------------------------------------------------ outputs


def make_symlink(path: Path) -> Path:
    """A symbolic link at path to a regular file beside it; returns the target."""
    target = path.with_name("target.txt")
    target.write_text("keep me\n")
    path.symlink_to(target)
    return target


def make_char_device(path: Path) -> None:
    """A character device: the null device's numbers (1, 3), so that even a writer that went through wrote
    nowhere."""
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


CAN_MKNOD = os.geteuid() == 0
NEEDS_MKNOD = pytest.mark.skipif(
    not CAN_MKNOD, reason="creating a device needs root; test_dev_null_stays_a_device covers devices"
)


def describe(path: Path) -> tuple:
    """What a path is, without following a link: its type, its link target, and its inode (the same object, not a
    replacement)."""
    info = os.lstat(path)
    return stat.S_IFMT(info.st_mode), os.readlink(path) if path.is_symlink() else None, info.st_ino


OUTPUTS = [
    pytest.param(make_symlink, "a symbolic link", id="symlink"),
    pytest.param(lambda path: path.symlink_to(path.with_name("nowhere")), "a symbolic link", id="dangling-symlink"),
    pytest.param(os.mkfifo, "a FIFO (named pipe)", id="fifo"),
    pytest.param(os.mkdir, None, id="directory"),
    pytest.param(make_char_device, "a character device", id="char-device", marks=NEEDS_MKNOD),
]


@pytest.mark.parametrize("make, kind", OUTPUTS)
def test_outputs_that_are_not_regular_files_are_refused_and_left_as_they_were(
    copied_checkpoint, tmp_path, capsys, make, kind
):
    output = tmp_path / "out" / "x.out"
    output.parent.mkdir()
    target = make(output)
    state, target_bytes = describe(output), target.read_bytes() if target else None
    expected = (
        f"output {output} is a directory; give a file name"
        if kind is None
        else f"output {output} is {kind}, not a regular file; give the name of a regular file or a new one"
    )
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(copied_checkpoint), "-o", str(output)])
    assert exit_info.value.code == f"dynnet-export: error: {expected}"
    error = error_of(
        ["predict", "--ckpt_path", str(copied_checkpoint), "--predictions.path", str(output),
         "--trainer.default_root_dir", str(tmp_path / "root")],
        capsys,
    )  # fmt: skip
    assert error == f"dynnet: error: {expected}"
    assert describe(output) == state
    if target:
        assert target.read_bytes() == target_bytes
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(
        ["x.out", *([target.name] if target else [])]
    )  # no temporary file left beside it


def test_dev_null_stays_a_device(copied_checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="output /dev/null is a character device, not a regular file"):
        check_output_path("/dev/null", inputs=[])
    # As root, a writer that went through would replace the machine's /dev/null: root writes to a null device of its
    # own instead, the same kind of file.
    device = tmp_path / "null" if CAN_MKNOD else Path("/dev/null")
    if CAN_MKNOD:
        make_char_device(device)
    with pytest.raises(SystemExit, match=f"dynnet-export: error: output {device} is a character device"):
        export_main([str(copied_checkpoint), "-o", str(device)])
    assert stat.S_ISCHR(os.lstat(device).st_mode)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(make_symlink, id="symlink"),
        pytest.param(os.mkfifo, id="fifo"),
        pytest.param(os.mkdir, id="directory"),
        pytest.param(make_char_device, id="device", marks=NEEDS_MKNOD),
    ],
)
def test_write_atomically_never_replaces_what_is_not_a_regular_file(tmp_path, make):
    """The check right before the rename: a path that became a link or a device after the command's own check
    (or that no check looked at) is still never replaced."""
    path = tmp_path / "x.out"
    target = make(path)
    state = describe(path)
    with pytest.raises(ValueError, match=f"refusing to replace {path}: it is .*, not a regular file"):
        write_atomically(path, lambda file: file.write(b"new"))
    assert describe(path) == state
    if target:
        assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.out", *([target.name] if target else [])])


def test_a_regular_file_is_still_replaced(copied_checkpoint, tmp_path):
    output = tmp_path / "polynomial.json"
    output.write_text("old\n")
    export_main([str(copied_checkpoint), "-o", str(output)])
    assert output.read_text().startswith("{") and "NaN" not in output.read_text()
