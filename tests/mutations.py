"""Plant known bugs one at a time in a scratch copy and check that the suite catches each.

    .venv/bin/python tests/mutations.py [--only ID ...] [--out results/mutations.md]

Every entry below is a small, realistic bug (one text replacement in one file) and the
tests that exist to catch it. For each, the committed project (``--rev``, default HEAD)
is copied to a scratch folder, the
bug is planted, and those tests are run there: the bug is caught when at least one of
them fails. The run prints (and writes) the table bug -> result -> failing tests. It is
a development check, not part of the suite (it runs the relevant tests once per bug).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    id: str
    bug: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]


MUTATIONS: List[Mutation] = [
    Mutation("feather-reversed", "tile blending ramps reversed (weights rise towards the tile's edges)",
             "dsrdmpd/inference.py", "r[:k], r[n - k:] = edge, edge.flip(0)", "r[:k], r[n - k:] = edge.flip(0), edge",
             ("tests/test_evaluation.py",)),
    Mutation("pad-top-left", "odd sizes padded at the top/left instead of the bottom/right",
             "dsrdmpd/inference.py", "F.pad(x, (0, pw, 0, ph), mode=mode)", "F.pad(x, (pw, 0, ph, 0), mode=mode)",
             ("tests/test_evaluation.py", "tests/test_models.py")),
    Mutation("crop-wrong-corner", "outputs cropped from the bottom-right corner",
             "dsrdmpd/inference.py", "return DehazeResult(c[..., :h, :w], r[..., :h, :w])",
             "return DehazeResult(c[..., -h:, -w:], r[..., -h:, -w:])",
             ("tests/test_evaluation.py", "tests/test_models.py")),
    Mutation("ema-decay-ignored", "train.ema_decay ignored (fixed 0.995)",
             "dsrdmpd/training/stage2.py", 'beta=float(self.tcfg["ema_decay"])', "beta=0.995",
             ("tests/test_training.py::test_ema_follows_the_configured_decay",)),
    Mutation("ema-not-restored", "EMA state not restored on resume",
             "dsrdmpd/training/stage2.py", 'self.ema.load_state_dict(state["ema_state"])', "pass",
             ("tests/test_training.py::test_resume_is_bit_exact",)),
    Mutation("weights-ema-ignored", "--weights ema loads the raw weights of a project checkpoint",
             "dsrdmpd/checkpoints.py", 'key = "ema" if weights == "ema" else "model"', 'key = "model"',
             ("tests/test_training.py::test_ema_follows_the_configured_decay",)),
    Mutation("official-ema-ignored", "weights='ema' ignores the 'ema' entry of an official file",
             "dsrdmpd/checkpoints.py", '        if weights == "ema":\n            ema = obj.get("ema")',
             '        if False:\n            ema = obj.get("ema")',
             ("tests/test_chain.py::test_official_ema_entry_loads_with_weights_ema",)),
    Mutation("psnr-no-clamp", "paper PSNR/SSIM without clamping the output to [0, 1]",
             "dsrdmpd/metrics.py", "a, b = pred.clamp(0, 1), target.clamp(0, 1)", "a, b = pred, target",
             ("tests/test_evaluation.py",)),
    Mutation("tiff16-via-8bit", "16-bit TIFF written from 8-bit levels scaled up",
             "dsrdmpd/imageio.py", "        arr = to_uint(image, bit_depth)\n        write_atomic(path, lambda p: tifffile",
             "        arr = to_uint(image, 8).astype(np.uint16) * 257 if bit_depth == 16 else to_uint(image, 8)\n"
             "        write_atomic(path, lambda p: tifffile",
             ("tests/test_data.py", "tests/test_evaluation.py::test_16bit_tiff_in_16bit_out")),
    Mutation("pair-by-order", "GT files paired by sorted position instead of by key",
             "dsrdmpd/data/pairing.py", "return [ImagePair(k, hazy[k], gt[k]) for k in sorted(hazy, key=_natural)]",
             "return [ImagePair(k, hazy[k], g) for k, g in zip(sorted(hazy, key=_natural), sorted(gt.values()))]",
             ("tests/test_data.py",)),
    Mutation("flip-hazy-only", "augmentation flips the hazy image but not its GT",
             "dsrdmpd/data/dataset.py", "hazy, gt = hazy.flip(-1), gt.flip(-1)", "hazy, gt = hazy.flip(-1), gt",
             ("tests/test_data.py",)),
    Mutation("rng-not-restored", "global torch RNG state not restored on resume",
             "dsrdmpd/training/common.py", 'torch.set_rng_state(state["torch"])', "pass",
             ("tests/test_training.py::test_rng_capture_and_restore_round_trip",)),
    Mutation("buffer-check-off", "official stage-2 schedule buffers not checked",
             "dsrdmpd/checkpoints.py", "    for name, ours in schedule.official_buffers().items():",
             "    for name, ours in []:",
             ("tests/test_chain.py",)),
    Mutation("fp16-stage2-half", "a float16 stage-2 file makes the network run in float16",
             "dsrdmpd/builders.py", "    check_stage2_buffers(buffers, model.schedule, str(path))\n    load_into(model.net, net_sd, str(path))",
             "    check_stage2_buffers(buffers, model.schedule, str(path))\n    load_into(model.net, net_sd, str(path))\n"
             "    if next(iter(net_sd.values())).dtype == torch.float16:\n        model.net.half()",
             ("tests/test_chain.py",)),
    Mutation("protocol-ignored", "test.py --protocol ignored (always paper)",
             "dsrdmpd/cli/batch.py", "run_items(dehazer, items, out, protocol, resize,",
             'run_items(dehazer, items, out, "paper", resize,',
             ("tests/test_evaluation.py::test_standard_protocol_through_test_script",)),
    Mutation("tile-ignored", "dehaze.py/test.py --tile ignored",
             "dsrdmpd/cli/options.py", "opts = dict(tile=args.tile,", "opts = dict(tile=None,",
             ("tests/test_evaluation.py::test_dehaze_script_tiles_as_asked",)),
    Mutation("yaml-sampling-ignored", "from_checkpoints(config=yaml) ignores the sampling section",
             "dsrdmpd/inference.py", 'sampling = {**DEFAULTS["sampling"], **((config or {}).get("sampling") or {})}',
             'sampling = dict(DEFAULTS["sampling"])',
             ("tests/test_chain.py::test_config_given_as_a_yaml_path",)),
    Mutation("missing-yaml-silent", "a missing config file is silently treated as empty",
             "dsrdmpd/config.py", '    if not path.is_file():\n        raise ConfigError(f"config file not found: {path}")',
             "    if not path.is_file():\n        return {}",
             ("tests/test_config.py",)),
    Mutation("bad-set-silent", "a malformed --set override is silently ignored",
             "dsrdmpd/config.py", '        raise ConfigError(f"override {item!r} must look like key.sub=value")',
             "        return",
             ("tests/test_config.py",)),
    Mutation("bf16-stage2-stays-fp32", "precision='bf16' leaves stage 2 in float32",
             "dsrdmpd/inference.py", 'if self.precision == "bf16" or (self.precision == "bf16-stage1" and stage == 1):',
             'if stage == 1 and self.precision in ("bf16", "bf16-stage1"):',
             ("tests/test_speed_options.py",)),
    Mutation("bad-item-ends-run", "one unreadable file ends the whole batch",
             "dsrdmpd/evaluation.py", "        except ITEM_ERRORS as exc:", "        except ():  # noqa\n            exc = None",
             ("tests/test_cli.py::test_bad_files_are_skipped_and_reported",)),
    Mutation("resume-redoes-nothing-kept", "--resume starts over and clears the records",
             "dsrdmpd/cli/batch.py", "        if not args.resume:\n            clear_records(out)",
             "        clear_records(out)",
             ("tests/test_cli.py::test_killed_run_resumes_to_identical_results",)),
    Mutation("shard-ignored", "every process does every item under accelerate launch",
             "dsrdmpd/evaluation.py", "mine = list(enumerate(items))[rank::world]", "mine = list(enumerate(items))",
             ("tests/test_cli.py::test_two_processes_give_the_files_of_one",)),
    Mutation("png16-as-8bit", "a 16-bit PNG is written back as 8-bit",
             "dsrdmpd/evaluation.py", "return bit_depth if path.suffix.lower() in KEPT_FORMATS else 8",
             "return bit_depth if path.suffix.lower() in TIFF_EXTENSIONS else 8",
             ("tests/test_cli.py::test_bad_files_are_skipped_and_reported",)),
    Mutation("best-on-test", "best.pt chosen on the test split",
             "dsrdmpd/training/trainer.py", "if not self.val_on_test and metrics[key] > self.best[\"psnr\"]:",
             "if metrics[key] > self.best[\"psnr\"]:",
             ("tests/test_recipe.py::test_validation_on_test_is_loud_and_chooses_nothing",)),
    Mutation("hazy-condition-dropped", "the 9-channel variant feeds the coarse image where the hazy one belongs",
             "dsrdmpd/models/rdmpd_unet.py", "return torch.cat((x_t, coarse, hazy) if self.input_condition",
             "return torch.cat((x_t, coarse, coarse) if self.input_condition",
             ("tests/test_parity.py",)),
    Mutation("raster-excess-dropped", "mapping back to raster units drops what the stretch clipped",
             "dsrdmpd/radiometry.py", "out = lo + unit.numpy().astype(ft) * (hi - lo) + excess",
             "out = lo + unit.numpy().astype(ft) * (hi - lo)", ("tests/test_raster.py",)),
    Mutation("raster-nodata-ignored", "nodata pixels written with the networks' values",
             "dsrdmpd/raster.py", "out[:, ~valid] = dtype.type(src.nodata)", "pass", ("tests/test_raster.py",)),
    Mutation("raster-noise-whole-scene", "streamed tiles draw their own noise instead of the scene's field",
             "dsrdmpd/raster.py", "ns = torch.cat([dehazer.tile_noise(plan, *chunk[j]) for j in run])",
             "ns = torch.cat([dehazer.tile_noise(plan, 0, 0) for j in run])", ("tests/test_raster.py",)),
    Mutation("raster-geotransform-lost", "output GeoTIFF written without the input's transform",
             "dsrdmpd/raster.py", "    profile = src.profile.copy()\n",
             "    profile = src.profile.copy()\n    profile.pop('transform', None)\n", ("tests/test_raster.py",)),
    Mutation("raster-bands-in-request-order", "dehazed bands written in --bands order instead of the file's",
             "dsrdmpd/raster.py", "dst.write(out[order[k]], out_bands.index(b) + 1, window=win)",
             "dst.write(out[k], out_bands.index(b) + 1, window=win)", ("tests/test_raster.py",)),
    Mutation("tf32-left-on", "precision fp32 leaves TensorFloat-32 on for GPU runs",
             "dsrdmpd/inference.py", "= self.precision == \"tf32\"", "= True",
             ("tests/test_speed_options.py::test_tensorfloat32_flags_for_a_cuda_dehazer",)),
    Mutation("accelerate-state-kept", "a second trainer in one process keeps the first one's accelerate state",
             "dsrdmpd/training/trainer.py", "    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):",
             "    if False:", ("tests/test_training.py::test_second_trainer_in_one_process_gets_its_own_settings",)),
    Mutation("synthetic-test-leak", "the demo's training crops drawn from the held-out part of each source image",
             "dsrdmpd/data/synthetic.py", "generator=g))][0], size, g)", "generator=g))][1], size, g)",
             ("tests/test_data.py::test_synthetic_test_scenes_come_from_pixels_training_never_sees",)),
    # parity bounds derived from float32 rounding (issue 20)
    Mutation("sample-one-level-one-pixel", "the sampler adds one 8-bit level to one pixel of its output",
             "dsrdmpd/diffusion/residual_diffusion.py", "        out = to_unit(img)\n",
             "        out = to_unit(img)\n        out[:, 0, 0, 0] += 1 / 255\n",
             ("tests/test_parity.py::test_stage2_sample",)),
    Mutation("norm-eps-tenfold-small", "weight standardisation / layer norm eps 1e-6 instead of 1e-5",
             "dsrdmpd/models/unet_blocks.py", "return 1e-5 if dtype == torch.float32 else 1e-3",
             "return 1e-6 if dtype == torch.float32 else 1e-3",
             ("tests/test_parity.py::test_stage2_network_outputs",)),
]


def copy_project(dst: Path, rev: str) -> None:
    """The committed tree at ``rev`` (not the working tree, which may be mid-edit)."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)


def run_one(m: Mutation, scratch: Path, python: str, rev: str) -> Tuple[str, str, float]:
    work = scratch / m.id
    copy_project(work, rev)
    target = work / m.file
    text = target.read_text()
    if text.count(m.old) != 1:
        return "NOT PLANTED", f"pattern found {text.count(m.old)} times in {m.file}", 0.0
    target.write_text(text.replace(m.old, m.new))
    t0 = time.time()
    proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests], cwd=work,
                          capture_output=True, text=True)
    dt = time.time() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode == 0:
        return "MISSED", "all selected tests passed", dt
    return "caught", ", ".join(f.split("::", 1)[-1] for f in failed) or f"pytest exit {proc.returncode}", dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutation ids to run (default: all)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rev", default="HEAD", help="git revision to check (the committed tree, not the working tree)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    lines = ["| bug | planted in | result | failing tests | seconds |", "|---|---|---|---|---|"]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="dsrdmpd-mut-") as tmp:
        for m in chosen:
            result, detail, dt = run_one(m, Path(tmp), args.python, args.rev)
            missed += result != "caught"
            lines.append(f"| {m.bug} | `{m.file}` | {result} | {detail} | {dt:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    print(f"\n{len(chosen) - missed} of {len(chosen)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
