"""A checkpoint whose bytes changed, or whose contents could not have been trained, is refused by every reader in
one line; an output path that is not a regular file is refused and left as it was. Real checkpoints from a real
fit, damaged on disk; real symbolic links, FIFOs, directories and devices."""

import io
import math
import os
import reprlib
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, error_of, last

from dynnet.checkpoint import CheckpointError, load_checkpoint, write_atomically
from dynnet.cli import main
from dynnet.module import DynamicNet
from dynnet.predictions import check_output_path, export_main

RESUME = [*TINY, "--trainer.max_steps", "400"]  # the trained run's settings, with steps left to train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The root of a tiny real fit: lightning_logs/version_0 with its last.ckpt at step 200."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root)])
    return root


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run under tmp_path/root; returns its last.ckpt."""
    shutil.copytree(trained / "lightning_logs", tmp_path / "root" / "lightning_logs")
    return last(tmp_path / "root")


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


@pytest.mark.parametrize("flip", [flip_in_tensor, flip_in_pickle], ids=["tensor-data", "data.pkl"])
def test_one_flipped_bit_is_refused_by_every_reader(run_copy, tmp_path, capsys, flip):
    checkpoint = run_copy
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
def test_dynnet_export_refuses_a_flipped_bit_as_a_process(run_copy, tmp_path):
    flip_in_tensor(run_copy)
    output = tmp_path / "polynomial.json"
    done = subprocess.run(
        [sys.executable, "-c", "from dynnet.predictions import export_main; export_main()", str(run_copy), "-o",
         str(output)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"dynnet-export: error: checkpoint {run_copy} is damaged")
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert not output.exists()


def test_every_record_of_a_written_checkpoint_carries_a_real_crc32(trained):
    with zipfile.ZipFile(last(trained)) as archive:
        assert archive.testzip() is None
        assert all(i.CRC != 0 for i in archive.infolist() if i.file_size > 0)


def test_a_record_marked_as_a_directory_is_refused(run_copy):
    """One bit of a record's attributes in the zip's central directory: torch's reader then takes the tensor's
    record for an empty directory and the tensor for whatever memory it got; the CRC-32 still matches."""
    data = bytearray(run_copy.read_bytes())
    name = tensor_record(run_copy, "model.shared")
    with zipfile.ZipFile(run_copy) as archive:
        entry = data.index(b"PK\x01\x02", archive.start_dir)
        while not data[entry + 46 :].startswith(next(n for n in archive.namelist() if n.endswith(name)).encode()):
            entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 38] |= 0x10  # the external attributes' MS-DOS directory bit
    run_copy.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"is damaged: .*record archive/{name} is marked as a directory"):
        load_checkpoint(run_copy)


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
def test_no_flipped_bit_anywhere_changes_what_loads(trained, tmp_path):
    """Each byte of a real checkpoint, one bit flipped (bit = position mod 8): load_checkpoint refuses the file
    in one line or returns exactly the original contents (a flip in bytes no reader uses: padding, the local
    headers' copies of the CRC and the time)."""
    original_path = last(trained)
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


# ------------------------------------------------------------------------------------------------ contents


def crafted(run_copy: Path, change) -> Path:
    """The run's last.ckpt rewritten by torch.save after change: whole and with valid CRC-32s, so only a check of
    its contents can refuse it."""
    checkpoint = torch.load(run_copy, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, run_copy)
    with zipfile.ZipFile(run_copy) as archive:
        assert archive.testzip() is None
    return run_copy


def string_lr(checkpoint: dict) -> None:
    checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] = "0.01"


# Refused by every reader: all read through load_checkpoint, which the flipped bits above reach too.
EVERY_READER = {
    "nan-weight": (
        lambda c: c["state_dict"].update({"model.shared": torch.tensor(float("nan"))}),
        "was refused: parameter model.shared is nan, not a finite number",
    ),
    "string-lr": (string_lr, "was refused: its optimizer state sets lr to '0.01', which should be a finite number"),
    "negative-and-huge-counts": (
        lambda c: c.update(degree_counts=[-5, 1e30, 0]),
        "was refused: degree_counts[0] is -5, not a whole number of draws",
    ),
}
CONTENTS = {
    "inf-weight": (
        lambda c: c["state_dict"].update({"model.coefficients.1": torch.tensor(float("-inf"))}),
        "was refused: parameter model.coefficients.1 is -inf, not a finite number",
    ),
    "string-recorded-lr": (
        lambda c: c["run_settings"]["optimizer_args"].update(lr="0.01"),
        "was refused: its run_settings' optimizer_args sets lr to '0.01', which should be a finite number",
    ),
    "nan-momentum": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(momentum=float("nan")),
        "was refused: its optimizer state sets momentum to nan, which should be a finite number",
    ),
    "integer-lr-past-float": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=2**2000),
        f"was refused: its optimizer state sets lr to {reprlib.repr(2**2000)}, which should be a finite number",
    ),
    "string-flag": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(nesterov="False"),
        "was refused: its optimizer state sets nesterov to 'False', which should be True or False",
    ),
    "optimizer-states-not-a-list": (
        lambda c: c.update(optimizer_states={"lr": 1}),
        "is malformed: optimizer_states should be a list holding the one optimizer's state",
    ),
    "no-optimizer-state": (  # Lightning would resume the optimizer from scratch
        lambda c: c.update(optimizer_states=[]),
        "is malformed: optimizer_states should be a list holding the one optimizer's state",
    ),
    "param-groups-missing": (
        lambda c: c["optimizer_states"][0].pop("param_groups"),
        "is malformed: its optimizer state should list its parameter groups (param_groups)",
    ),
    "state-not-a-mapping": (
        lambda c: c["optimizer_states"][0].update(state=[1, 2]),
        "is malformed: its optimizer state should map each parameter's index to that parameter's state",
    ),
    "params-not-indices": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(params=["a"]),
        "is malformed: its optimizer's parameter groups should list their parameters' indices",
    ),
    "schedulers-not-a-list": (
        lambda c: c.update(lr_schedulers="none"),
        "is malformed: lr_schedulers should be a list of learning-rate scheduler states",
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
}


@pytest.mark.parametrize("change, reason", EVERY_READER.values(), ids=EVERY_READER.keys())
def test_implausible_contents_are_refused_by_every_reader(run_copy, tmp_path, capsys, change, reason):
    checkpoint = crafted(run_copy, change)
    before = snapshot(tmp_path)
    for reader, error in readers_errors(checkpoint, tmp_path, capsys).items():
        assert error == f"checkpoint {checkpoint} {reason}", reader
    with pytest.raises(CheckpointError) as refusal:
        DynamicNet.load_from_checkpoint(checkpoint)
    assert str(refusal.value) == f"checkpoint {checkpoint} {reason}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("change, reason", CONTENTS.values(), ids=CONTENTS.keys())
def test_implausible_contents_are_refused(run_copy, change, reason):
    checkpoint = crafted(run_copy, change)
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(checkpoint)
    assert str(refusal.value) == f"checkpoint {checkpoint} {reason}"


def test_plausible_contents_load(run_copy):
    """Degree counts beyond global_step (a model trained by two fits on two Trainers has drawn more), a tensor lr
    (which torch accepts) and Adafactor's eps pair with its None are all a checkpoint may hold."""

    def change(checkpoint: dict) -> None:
        checkpoint["degree_counts"] = [10**6, 2**52 - 1, 0]
        group = checkpoint["optimizer_states"][0]["param_groups"][0]
        group["lr"], group["eps"] = torch.tensor(1e-8), (None, 1e-3)

    checkpoint = load_checkpoint(crafted(run_copy, change))
    assert checkpoint["degree_counts"] == [10**6, 2**52 - 1, 0] and checkpoint["global_step"] == 200


def stepped(kind: type, scheduler: type | None = None) -> dict:
    """An optimizer's state after one real step on one scalar parameter, under a scheduler if given."""
    parameter = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = kind([parameter], lr=0.1)
    if scheduler is not None:
        scheduler(optimizer, max_lr=0.1, total_steps=10)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (parameter - 3) ** 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer.state_dict()


def optimizer_states() -> dict[str, dict]:
    """The real states of every optimizer in torch.optim that takes a scalar parameter, and of SGD and Adam under
    OneCycleLR, which adds entries to their parameter groups."""
    states = {}
    for name in dir(torch.optim):
        kind = getattr(torch.optim, name)
        if isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer) and kind is not torch.optim.Optimizer:
            try:
                states[name] = stepped(kind)
            except (ValueError, RuntimeError):  # Muon takes matrices only, SparseAdam sparse gradients only
                continue
    for kind in (torch.optim.SGD, torch.optim.Adam):
        states[f"{kind.__name__}+OneCycleLR"] = stepped(kind, torch.optim.lr_scheduler.OneCycleLR)
    return states


def test_every_torch_optimizers_state_is_accepted(run_copy):
    states = optimizer_states()
    assert {"SGD", "Adam", "LBFGS", "Adafactor", "Rprop", "SGD+OneCycleLR"} <= states.keys()
    for name, state in states.items():
        path = crafted(run_copy, lambda c, state=state: c.update(optimizer_states=[state]))
        assert load_checkpoint(path)["optimizer_states"][0]["param_groups"] == state["param_groups"], name


def test_strict_false_accepts_a_partial_state_dict_but_still_checks_what_it_holds(run_copy):
    path = crafted(run_copy, lambda c: c["state_dict"].pop("model.coefficients.0"))
    with pytest.raises(CheckpointError, match="its state_dict should hold exactly"):
        load_checkpoint(path)
    assert "model.coefficients.0" not in load_checkpoint(path, strict=False)["state_dict"]
    crafted(run_copy, lambda c: c["state_dict"].update({"model.shared": torch.tensor(float("nan"))}))
    with pytest.raises(CheckpointError, match="parameter model.shared is nan"):
        load_checkpoint(path, strict=False)


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


def describe(path: Path) -> tuple:
    """What a path is, without following a link: its type, its link target, and its inode (the same object, not a
    replacement)."""
    info = os.lstat(path)
    return stat.S_IFMT(info.st_mode), os.readlink(path) if path.is_symlink() else None, info.st_ino


OUTPUTS = {
    "symlink": (make_symlink, "a symbolic link"),
    "dangling-symlink": (lambda path: path.symlink_to(path.with_name("nowhere")), "a symbolic link"),
    "fifo": (os.mkfifo, "a FIFO (named pipe)"),
    "directory": (os.mkdir, None),
    "char-device": (make_char_device, "a character device"),
}


@pytest.mark.parametrize("make, kind", OUTPUTS.values(), ids=OUTPUTS.keys())
def test_outputs_that_are_not_regular_files_are_refused_and_left_as_they_were(run_copy, tmp_path, capsys, make, kind):
    if make is make_char_device and not CAN_MKNOD:
        pytest.skip("creating a device needs root; test_dev_null_stays_a_device covers devices")
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
        export_main([str(run_copy), "-o", str(output)])
    assert exit_info.value.code == f"dynnet-export: error: {expected}"
    error = error_of(
        ["predict", "--ckpt_path", str(run_copy), "--predictions.path", str(output),
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


def test_dev_null_stays_a_device(run_copy, tmp_path, capsys):
    with pytest.raises(ValueError, match="output /dev/null is a character device, not a regular file"):
        check_output_path("/dev/null", inputs=[])
    if CAN_MKNOD:  # as root a writer that went through would replace the machine's /dev/null: only the check runs
        return
    with pytest.raises(SystemExit, match="dynnet-export: error: output /dev/null is a character device"):
        export_main([str(run_copy), "-o", "/dev/null"])
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


@pytest.mark.parametrize(
    "make", [make_symlink, os.mkfifo, os.mkdir, make_char_device], ids=["symlink", "fifo", "directory", "device"]
)
def test_write_atomically_never_replaces_what_is_not_a_regular_file(tmp_path, make):
    """The check right before the rename: a path that became a link or a device after the command's own check
    (or that no check looked at) is still never replaced."""
    if make is make_char_device and not CAN_MKNOD:
        pytest.skip("creating a device needs root")
    path = tmp_path / "x.out"
    target = make(path)
    state = describe(path)
    with pytest.raises(ValueError, match=f"refusing to replace {path}: it is .*, not a regular file"):
        write_atomically(path, lambda file: file.write(b"new"))
    assert describe(path) == state
    if target:
        assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.out", *([target.name] if target else [])])


def test_a_regular_file_is_still_replaced(run_copy, tmp_path):
    output = tmp_path / "polynomial.json"
    output.write_text("old\n")
    export_main([str(run_copy), "-o", str(output)])
    assert output.read_text().startswith("{") and "NaN" not in output.read_text()
