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
             "dsrdmpd/data/pairing.py", "return [ImagePair(k, hazy[k], gt[k]) for k in sorted(hazy, key=natural_key)]",
             "return [ImagePair(k, hazy[k], g) for k, g in zip(sorted(hazy, key=natural_key), sorted(gt.values()))]",
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
             "dsrdmpd/builders.py",
             "        check_stage2_buffers(buffers, model.schedule, str(path))\n        load_into(model.net, net_sd, str(path))",
             "        check_stage2_buffers(buffers, model.schedule, str(path))\n        load_into(model.net, net_sd, str(path))\n"
             "        if next(iter(net_sd.values())).dtype == torch.float16:\n            model.net.half()",
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
    Mutation("bf16-stage1-stays-fp32", "precision='bf16' leaves stage 1 in float32 (stage 2 still bf16)",
             "dsrdmpd/inference.py", 'if self.precision == "bf16" or (self.precision == "bf16-stage1" and stage == 1):',
             'if (self.precision == "bf16" and stage == 2) or (self.precision == "bf16-stage1" and stage == 1):',
             ("tests/test_speed_options.py::test_bf16_accuracy_cpu",)),
    Mutation("bad-item-ends-run", "one unreadable file ends the whole batch",
             "dsrdmpd/evaluation.py",
             "        except Exception as exc:                   # one item's failure; interruptions are not Exceptions",
             "        except ():  # noqa\n            exc = None",
             ("tests/test_cli.py::test_bad_files_are_skipped_and_reported",)),
    Mutation("resume-redoes-nothing-kept", "--resume starts over and clears the records",
             "dsrdmpd/runfolder.py", "        if not resume:\n            shutil.rmtree(self.records",
             "        if True:\n            shutil.rmtree(self.records",
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
             "dsrdmpd/raster.py", "out[:, ~valid] = values[:, ~valid]", "pass", ("tests/test_raster.py",)),
    Mutation("raster-noise-whole-scene", "streamed tiles draw their own noise instead of the scene's field",
             "dsrdmpd/raster.py", "ns = torch.cat([dehazer.tile_noise(plan, *chunk[j]) for j in run])",
             "ns = torch.cat([dehazer.tile_noise(plan, 0, 0) for j in run])", ("tests/test_raster.py",)),
    Mutation("raster-geotransform-lost", "output GeoTIFF written without the input's transform",
             "dsrdmpd/raster.py", "    profile = src.profile.copy()\n",
             "    profile = src.profile.copy()\n    profile.pop('transform', None)\n", ("tests/test_raster.py",)),
    Mutation("raster-bands-in-request-order", "dehazed bands written in --bands order instead of the file's",
             "dsrdmpd/raster.py", "block[out_bands.index(b)] = out[order[k], :, x0:x0 + cols.width]",
             "block[out_bands.index(b)] = out[k, :, x0:x0 + cols.width]", ("tests/test_raster.py",)),
    Mutation("tf32-left-on", "precision fp32 leaves TensorFloat-32 on for GPU runs",
             "dsrdmpd/inference.py", "= self.precision == \"tf32\"", "= True",
             ("tests/test_speed_options.py::test_tensorfloat32_flags_for_a_cuda_dehazer",)),
    Mutation("accelerate-state-kept", "a second trainer in one process keeps the first one's accelerate state",
             "dsrdmpd/training/trainer.py", "    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):",
             "    if False:", ("tests/test_training.py::test_second_trainer_in_one_process_gets_its_own_settings",)),
    Mutation("synthetic-test-leak", "the demo's training crops drawn from the held-out part of each source image",
             "dsrdmpd/data/synthetic.py", "generator=g))][0], size, g)", "generator=g))][1], size, g)",
             ("tests/test_data.py::test_synthetic_test_scenes_come_from_pixels_training_never_sees",)),
    # scoring existing results (dsrdmpd-score) and the reproduce table's peers (issue 21)
    Mutation("y-coeffs-swapped", "Y protocol with the R and B luma weights swapped (a BGR / RGB mix-up)",
             "dsrdmpd/metrics.py", "BT601_Y = (65.481, 128.553, 24.966)", "BT601_Y = (24.966, 128.553, 65.481)",
             ("tests/test_score.py::test_y_of_known_colours",
              "tests/test_score.py::test_every_protocol_on_odd_8bit_images_against_skimage_and_numpy")),
    Mutation("crop-border-ignored", "dsrdmpd-score --crop-border ignored",
             "dsrdmpd/scoring.py", "a, b = crop_border(a, border), crop_border(b, border)", "a, b = a, b",
             ("tests/test_score.py::test_crop_border_drops_the_border_from_every_column",)),
    Mutation("ciede-of-mean-colour", "CIEDE2000 of the images' mean colours instead of the mean per-pixel difference",
             "dsrdmpd/metrics.py", "float(deltaE_ciede2000(lab(a), lab(b)).mean())",
             "float(deltaE_ciede2000(lab(a).mean((0, 1)), lab(b).mean((0, 1))))",
             ("tests/test_score.py::test_ciede2000_on_published_pairs",)),
    Mutation("restored-orphans-ignored", "restored files matching no ground truth silently ignored",
             "dsrdmpd/scoring.py", "    if orphans or missing:", "    if missing:",
             ("tests/test_score.py::test_mismatched_names_are_a_named_error",)),
    Mutation("peer-wrong-protocol", "peers' outputs scored under the paper protocol whatever the suite's protocol",
             "dsrdmpd/cli/reproduce.py", "cell = score_peer(peer, folder, name, ds, protocol, args.output)",
             "cell = score_peer(peer, folder, name, ds, \"paper\", args.output)",
             ("tests/test_score.py::test_reproduce_table_with_a_scored_peer_column",)),
    # issue 19, part B: batch runs survive one item, the run folder, limits, non-finite values
    Mutation("item-errors-narrow", "a batch catches only the old error types (an unforeseen exception ends the run)",
             "dsrdmpd/evaluation.py",
             "        except Exception as exc:                   # one item's failure; interruptions are not Exceptions",
             "        except (ValueError, OSError) as exc:",
             ("tests/test_batch_survival.py::test_one_bad_item_never_ends_the_run",)),
    Mutation("full-disk-per-item", "a full disk fails each remaining item instead of ending the run",
             "dsrdmpd/evaluation.py", '    """Whether ``exc`` ends the run instead of failing one item."""',
             '    """Whether ``exc`` ends the run instead of failing one item."""\n    return False',
             ("tests/test_batch_survival.py::test_a_full_disk_ends_the_run_with_one_line",)),
    Mutation("record-name-from-item", "record files named after the item (a long name cannot be recorded)",
             "dsrdmpd/runfolder.py",
             '    return hashlib.sha256(item_name.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json"',
             '    return item_name + ".json"', ("tests/test_batch_survival.py::test_one_bad_item_never_ends_the_run",)),
    Mutation("pixel-limit-ignored", "the pixel limit is not applied (checked against 1000 times the limit)",
             "dsrdmpd/imageio.py", "    if max_pixels is not None and h * w > max_pixels:",
             "    if max_pixels is not None and h * w > max_pixels * 1000:",
             ("tests/test_batch_survival.py::test_pixel_limit_is_read_from_the_header_before_decoding",)),
    Mutation("oom-not-retried", "an image that runs out of memory whole is not retried in tiles",
             "dsrdmpd/evaluation.py", "        if not out_of_memory(exc):\n            raise",
             "        if True:\n            raise",
             ("tests/test_batch_survival.py::test_out_of_memory_is_retried_in_tiles",)),
    Mutation("nonfinite-output-accepted", "an output with NaN values is written (as a black image)",
             "dsrdmpd/evaluation.py", "    check_finite(result, item)\n", "",
             ("tests/test_batch_survival.py::test_a_non_finite_output_fails_its_item",)),
    Mutation("config-nan-accepted", "NaN / infinite config values accepted",
             "dsrdmpd/config.py", "        if not math.isfinite(v):", "        if False:",
             ("tests/test_batch_survival.py::test_config_errors_are_one_line_before_the_first_item",)),
    Mutation("output-overlap-unchecked", "a run may write into the folder its inputs come from",
             "dsrdmpd/cli/batch.py",
             "    check_outputs_apart(args.output, [p for i in items for p in (i.hazy, i.gt) if p is not None])",
             "    pass", ("tests/test_batch_survival.py::test_a_run_never_writes_into_its_inputs",)),
    Mutation("lock-shared", "the output folder's lock is shared (two runs both get it)",
             "dsrdmpd/runfolder.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
             "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
             ("tests/test_runfolder.py::test_a_second_run_on_the_same_folder_is_refused",
              "tests/test_runfolder.py::test_the_lock_is_held_by_another_process_too")),
    Mutation("fingerprint-not-compared", "--resume does not compare the folder's fingerprint",
             "dsrdmpd/runfolder.py", "        if resume and old is not None and old != fingerprint:",
             "        if False:", ("tests/test_runfolder.py::test_resume_refuses_another_fingerprint_and_names_the_field",)),
    Mutation("unreadable-record-crashes", "an unreadable record ends --resume with a JSONDecodeError",
             "dsrdmpd/runfolder.py", "        except (ValueError, UnicodeDecodeError, OSError) as exc:\n            warnings",
             "        except (UnicodeDecodeError, OSError) as exc:\n            warnings",
             ("tests/test_runfolder.py::test_unreadable_records_mean_not_done_and_are_named",)),
    Mutation("fresh-run-keeps-records", "a fresh run keeps the earlier run's records",
             "dsrdmpd/runfolder.py", "        if not resume:\n            shutil.rmtree", "        if False:\n            shutil.rmtree",
             ("tests/test_runfolder.py::test_a_fresh_run_clears_old_records_and_stale_files",)),
    Mutation("stale-files-kept", "temporaries and partial rasters of a killed run are never removed",
             "dsrdmpd/runfolder.py", "        self.remove_stale_files()\n", "",
             ("tests/test_runfolder.py::test_a_fresh_run_clears_old_records_and_stale_files",
              "tests/test_runfolder.py::test_resume_also_clears_stale_temporaries")),
    Mutation("summary-cells-raw", "file names and reasons go into summary.md's tables unescaped",
             "dsrdmpd/evaluation.py", "    text = str(value).replace(\"\\\\\", \"\\\\\\\\\").replace(\"|\", \"\\\\|\")",
             "    text = str(value)", ("tests/test_batch_survival.py::test_summary_cells_are_escaped",)),
    Mutation("list-file-escapes-root", "RealBlur list files may name paths outside the dataset root",
             "dsrdmpd/data/pairing.py", '    if rel.is_absolute() or re.match(r"^[A-Za-z]:", text) or ".." in rel.parts:',
             "    if False:", ("tests/test_datasets.py::test_realblur_list_lines_are_strict_and_stay_inside_the_root",)),
    Mutation("list-file-extra-tokens", "RealBlur list lines with three paths are cut to two silently",
             "dsrdmpd/data/pairing.py", "        if len(parts) != 2:", "        if len(parts) < 2:",
             ("tests/test_datasets.py::test_realblur_list_lines_are_strict_and_stay_inside_the_root",)),
    Mutation("raster-size-unlimited", "rasters of any declared size are accepted",
             "dsrdmpd/raster.py", "        if options.max_pixels is not None and src.width * src.height > options.max_pixels:",
             "        if False:", ("tests/test_raster.py::test_a_sparse_huge_raster_is_refused_before_reading",)),
    Mutation("gdal-cause-dropped", "a raster read error is reported without GDAL's cause",
             "dsrdmpd/raster.py", 'raise RasterError(f"{src_path}: {gdal_message(exc)}") from None',
             'raise RasterError(f"{src_path}: {exc}") from None',
             ("tests/test_raster.py::test_a_corrupt_tile_is_reported_with_the_file_and_gdals_cause",)),
    # issue 22: inference fast paths (weight-standardisation cache, normalisation per device, benchmark)
    Mutation("ws-cache-never-invalidated", "the standardised-weight cache survives an update of the weight",
             "dsrdmpd/models/unet_blocks.py", "if cached is None or cached[0] != key:", "if cached is None:",
             ("tests/test_fast_path.py::test_an_update_of_the_weight_invalidates_the_cache",)),
    Mutation("ws-cache-in-training", "the standardised-weight cache also used while autograd records",
             "dsrdmpd/models/unet_blocks.py",
             "if not self.cache_weight or torch.is_grad_enabled() or torch.compiler.is_compiling():",
             "if not self.cache_weight or torch.compiler.is_compiling():",
             ("tests/test_fast_path.py::test_training_recomputes_every_call_and_gradients_are_unchanged",)),
    Mutation("dehazer-ws-cache-off", "the Dehazer leaves the standardised-weight cache off",
             "dsrdmpd/inference.py", "set_weight_cache(set_fast_norm(net, fast_norm), True)",
             "set_weight_cache(set_fast_norm(net, fast_norm), False)",
             ("tests/test_fast_path.py::test_dehazer_caches_standardised_weights_exactly",)),
    Mutation("cpu-norm-not-native", "the CPU routed to the fast (non-native) normalisation",
             "dsrdmpd/models/norm.py", "return x.is_cuda and x.dim() == 4", "return x.dim() == 4",
             ("tests/test_fast_path.py::test_cpu_norm_is_bit_identical_to_group_norm",)),
    Mutation("split-merge-within-only", "chunk partials merged without the between-chunk term of the variance",
             "dsrdmpd/models/norm.py", "var = (m2 + count * (mean - total[:, None]) ** 2).sum(dim=1) / n",
             "var = m2.sum(dim=1) / n", ("tests/test_fast_path.py::test_split_reduction_statistics",)),
    Mutation("bench-flops-per-call", "the benchmark reports a batch's FLOPs as each image's",
             "dsrdmpd/benchmark.py", 'row["tflops_per_image"] = flops / batch / 1e12',
             'row["tflops_per_image"] = flops / 1e12', ("tests/test_benchmark.py::test_variants_table_on_the_cpu",)),
    # checkpoint loading and training state (issue 19, part A)
    Mutation("unsafe-unpickling", "checkpoints unpickled in full (weights_only=False): a file's pickle runs its code",
             "dsrdmpd/checkpoints.py", "return torch.load(path, map_location=\"cpu\", weights_only=True)",
             "return torch.load(path, map_location=\"cpu\", weights_only=False)",
             ("tests/test_checkpoint_safety.py::test_every_command_refuses_a_file_that_would_run_code",
              "tests/test_checkpoint_safety.py::test_trusting_a_file_is_an_explicit_choice")),
    Mutation("trust-always", "the refusal skipped: a file that needs unpickling is loaded without --trust-checkpoint",
             "dsrdmpd/checkpoints.py", "        if not trust:\n            names = unsafe_globals(path)",
             "        if False:\n            names = unsafe_globals(path)",
             ("tests/test_checkpoint_safety.py::test_every_command_refuses_a_file_that_would_run_code",)),
    Mutation("legacy-numpy-refused", "training checkpoints of earlier versions (NumPy RNG arrays) no longer load",
             "dsrdmpd/checkpoints.py", "with torch.serialization.safe_globals(legacy_numpy_globals()):",
             "with torch.serialization.safe_globals([]):",
             ("tests/test_checkpoint_safety.py::test_checkpoints_of_earlier_versions_load_without_trust",)),
    Mutation("rng-pickled-numpy", "the training state stores NumPy's RNG state as an array again (needs unpickling)",
             "dsrdmpd/training/common.py", "\"keys\": torch.from_numpy(keys.astype(np.int64))", "\"keys\": keys",
             ("tests/test_checkpoint_safety.py::test_training_random_state_is_plain_data",)),
    Mutation("rng-rank0-only", "every process restores the main process's random state on resume",
             "dsrdmpd/training/trainer.py", "            restore_rng(rng[rank], self.generators)",
             "            restore_rng(rng[0], self.generators)", ("tests/test_distributed_training.py::test_two_cpu_processes_resume_exactly",)),
    Mutation("cpu-launch-separate-runs", "train.device auto without CUDA under accelerate launch: N separate runs",
             "dsrdmpd/training/trainer.py",
             "cpu = device == \"cpu\" or (device == \"auto\" and not torch.cuda.is_available())",
             "cpu = device == \"cpu\"", ("tests/test_distributed_training.py::test_two_cpu_processes_resume_exactly",)),
    Mutation("non-finite-accepted", "checkpoint tensors with NaN / infinity are loaded",
             "dsrdmpd/checkpoints.py", "value.is_floating_point() and not bool(torch.isfinite(value).all())",
             "value.is_floating_point() and False", ("tests/test_checkpoint_safety.py::test_non_finite_weights_are_refused",)),
    Mutation("hash-check-skipped", "a weights folder's recorded SHA-256 hashes are not checked",
             "dsrdmpd/weights_folder.py", "        if actual != digest.lower():", "        if False:",
             ("tests/test_checkpoint_safety.py::test_converter_round_trip_hashes_and_weights_dir",)),
    Mutation("ema-not-converted", "the converter leaves out the EMA weights of a project checkpoint",
             "dsrdmpd/convert.py", "        if _has_ema(stage2, trust):", "        if False:",
             ("tests/test_checkpoint_safety.py::test_converting_our_training_checkpoint_keeps_the_ema",)),
    # parity bounds derived from float32 rounding (issue 20)
    Mutation("sample-one-level-one-pixel", "the sampler adds one 8-bit level to one pixel of its output",
             "dsrdmpd/diffusion/residual_diffusion.py", "        out = to_unit(img)\n",
             "        out = to_unit(img)\n        out[:, 0, 0, 0] += 1 / 255\n",
             ("tests/test_parity.py::test_stage2_sample",)),
    Mutation("norm-eps-tenfold-small", "weight standardisation / layer norm eps 1e-6 instead of 1e-5",
             "dsrdmpd/models/unet_blocks.py", "return 1e-5 if dtype == torch.float32 else 1e-3",
             "return 1e-6 if dtype == torch.float32 else 1e-3",
             ("tests/test_parity.py::test_stage2_network_outputs",)),
    # lead: the run fingerprint of a --weights-dir run
    Mutation("weights-dir-not-fingerprinted", "a --weights-dir run records no checkpoint hashes (a changed file resumes)",
             "dsrdmpd/cli/options.py", "        return list(stage_paths(args.weights_dir, args.weights))",
             "        return []", ("tests/test_runfolder.py::test_a_weights_folder_run_fingerprints_the_folder_files",)),
    # training step options and the compile cache (issue 22, items 4 and 6)
    Mutation("optimizer-load-takes-files-flags", "resuming takes the checkpoint's fused / capturable flags (a CPU run "
             "resumed from a fused checkpoint turns fused)", "dsrdmpd/training/step_options.py",
             "group.update(flags)", "group.update({})",
             ("tests/test_training_fast.py::test_optimizer_checkpoint_loads_into_either_implementation",)),
    Mutation("fused-auto-on-cpu", "train.fused_optimizer auto picks fused Adam on the CPU too (the CPU step changes)",
             "dsrdmpd/training/step_options.py", '(True if cuda else None) if fused == "auto"',
             'True if fused == "auto"', ("tests/test_training_fast.py::test_step_options_per_device",
                                         "tests/test_training_fast.py::test_cpu_trainer_default_is_plain_adam_and_the_options_reach_model_and_inputs")),
    Mutation("cuda-graph-allowed-on-cpu", "train.cuda_graph is not refused on the CPU",
             "dsrdmpd/training/step_options.py", "(not cuda, f\"CUDA graphs need", "(False, f\"CUDA graphs need",
             ("tests/test_training_fast.py::test_impossible_step_options_are_refused_in_one_line",
              "tests/test_training_fast.py::test_cpu_trainer_refuses_a_cuda_graph_before_writing_anything")),
    Mutation("lr-tensor-replaced-on-load", "loading a checkpoint replaces the learning-rate tensor a captured step reads",
             "dsrdmpd/training/step_options.py", '            group["lr"] = lr\n',
             '            group["lr"] = _plain(group["lr"])\n',
             ("tests/test_training_fast.py::test_load_keeps_a_tensor_learning_rate_in_place",)),
    Mutation("precision-bf16-drops-tf32", "train.precision bf16 switches TensorFloat-32 off for the non-autocast ops",
             "dsrdmpd/training/step_options.py", 'tcfg["tf32"] = precision != "fp32"',
             'tcfg["tf32"] = precision == "tf32"', ("tests/test_training_fast.py::test_precision_is_a_shorthand_for_tf32_and_mixed_precision",)),
    Mutation("fused-option-ignored", "train.fused_optimizer true still builds plain Adam",
             "dsrdmpd/training/step_options.py", 'extra["fused"] = True', 'extra["fused"] = None',
             ("tests/test_training_fast.py::test_fused_adam_equals_plain_adam_to_rounding",
              "tests/test_training_fast.py::test_cpu_trainer_default_is_plain_adam_and_the_options_reach_model_and_inputs")),
    Mutation("channels-last-inputs-not-converted", "train.channels_last converts the model but not the step's inputs",
             "dsrdmpd/training/trainer.py", "tuple(t.to(dev) for t in tensors), self.step_options.channels_last)",
             "tuple(t.to(dev) for t in tensors), False)",
             ("tests/test_training_fast.py::test_cpu_trainer_default_is_plain_adam_and_the_options_reach_model_and_inputs",)),
    Mutation("compile-cache-env-not-overridden", "the compile-cache folder does not replace an inductor cache folder "
             "already in the environment", "dsrdmpd/compile_cache.py",
             'os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)',
             'os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))',
             ("tests/test_training_fast.py::test_compile_cache_folder_is_set_before_compiling",)),
    Mutation("dehazer-ignores-compile-cache", "Dehazer(compile=True, compile_cache=DIR) ignores DIR",
             "dsrdmpd/inference.py", "use_compile_cache(compile_cache)", "use_compile_cache(None)",
             ("tests/test_training_fast.py::test_dehazer_with_compile_uses_the_cache_folder_before_its_first_call",)),
    # issue 22 item 5: --batch N in dehaze / test (same-size images per pipeline call)
    Mutation("batch-noise-by-position", "each image's start noise is seeded by its place in the batch",
             "dsrdmpd/diffusion/residual_diffusion.py",
             "generator=torch.Generator().manual_seed(int(seed))) for _ in range(b)]",
             "generator=torch.Generator().manual_seed(int(seed) + _)) for _ in range(b)]",
             ("tests/test_batching.py::test_batch_3_gives_the_results_of_batch_1",)),
    Mutation("batch-mixes-sizes", "images of different sizes are planned into one call",
             "dsrdmpd/evaluation.py", "        call = filling.get(key)\n        if call is None or len(call) >= batch:\n"
             "            call = filling[key] = []",
             "        call = filling.get(0)\n        if call is None or len(call) >= batch:\n"
             "            call = filling[0] = []",
             ("tests/test_batching.py::test_plan_groups_same_sizes_up_to_n_in_item_order", "tests/test_batching.py::test_batch_3_gives_the_results_of_batch_1")),
    Mutation("batch-first-output-for-all", "every image of a call is written with the first image's output",
             "dsrdmpd/evaluation.py", "one = DehazeResult(result.coarse[i:i + 1], result.restored[i:i + 1])",
             "one = DehazeResult(result.coarse[0:1], result.restored[0:1])", ("tests/test_batching.py::test_batch_3_gives_the_results_of_batch_1",)),
    Mutation("batch-failure-fails-group", "a call that fails fails all of its images",
             "dsrdmpd/evaluation.py", "                for k, item, read in same:\n"
             "                    self.run_alone(k, item, read)",
             "                for k, item, read in same:\n"
             "                    self.record(k, item, {\"name\": item.name, \"error\": \"its call failed\"})",
             ("tests/test_batching.py::test_a_non_finite_image_in_a_call_fails_alone", "tests/test_batching.py::test_a_call_that_runs_out_of_memory_is_redone_image_by_image")),
    Mutation("batch-nan-unchecked", "a NaN output of one image in a call is written (as a black image)",
             "dsrdmpd/evaluation.py",
             "        if any(count_non_finite(result).values()):", "        if False:", ("tests/test_batching.py::test_a_non_finite_image_in_a_call_fails_alone",)),
    Mutation("batch-error-ends-run", "a call that runs out of memory ends the run",
             "dsrdmpd/evaluation.py",
             "        except Exception as exc:                   # e.g. out of memory: each image alone may still fit",
             "        except ():  # noqa\n            exc = None", ("tests/test_batching.py::test_a_call_that_runs_out_of_memory_is_redone_image_by_image",)),
    Mutation("batch-unreadable-drops-call", "an unreadable image drops the images read before it in its call",
             "dsrdmpd/evaluation.py", "            if read is not None:\n                ready.setdefault(",
             "            if read is None:\n                ready = {}\n            else:\n                ready.setdefault(",
             ("tests/test_batching.py::test_an_unreadable_image_leaves_its_call_to_the_others",)),
    Mutation("batch-tiled-together", "images run with --tile are batched like the others",
             "dsrdmpd/evaluation.py", "    if dehazer.tile is not None or streams_as_raster(item, raster):",
             "    if streams_as_raster(item, raster):", ("tests/test_batching.py::test_tiled_images_run_alone",)),
    Mutation("batch-in-fingerprint", "--batch is part of the run fingerprint (a run cannot resume with another N)",
             "dsrdmpd/cli/batch.py", '"channels_last": bool(args.channels_last)})',
             '"channels_last": bool(args.channels_last), "batch": args.batch})', ("tests/test_batching.py::test_a_run_resumes_with_another_batch_size",)),
    # speed options held to derived float32-rounding bounds (issue 20)
    Mutation("tile-batch-noise-order", "batched tiles get their start noise in reverse order",
             "dsrdmpd/inference.py",
             "ns = torch.cat([tile_noise(i, y, xx) for i, y, xx in chunk]).to(self.device)",
             "ns = torch.cat([tile_noise(i, y, xx) for i, y, xx in chunk[::-1]]).to(self.device)",
             ("tests/test_speed_options.py::test_tile_batching_equals_one_tile_per_call",)),
    Mutation("channels-last-one-level", "the channels_last path adds one 8-bit level to one input pixel",
             "dsrdmpd/inference.py", "            x = x.contiguous(memory_format=torch.channels_last)\n",
             "            x = x.contiguous(memory_format=torch.channels_last).clone()\n            x[:, :, 5, 7] += 1 / 255\n",
             ("tests/test_speed_options.py::test_channels_last_matches_float32",)),
    Mutation("explicit-attention-half-scores", "the explicit attention rounds its scaled queries through float16",
             "dsrdmpd/models/unet_blocks.py", 'sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)',
             'sim = torch.einsum("bhdi,bhdj->bhij", (q * self.scale).half().float(), k)',
             ("tests/test_speed_options.py::test_fused_attention_equals_explicit",
              "tests/test_speed_options.py::test_fused_attention_sample_equals_explicit")),
    # CPU bfloat16 without oneDNN kernels (2026-11-30)
    Mutation("cpu-bf16-silent", "bfloat16 on a CPU without bf16 kernels runs the slow reference convolution silently",
             "dsrdmpd/inference.py", 'self.device.type == "cpu" and not cpu_has_bf16_kernels():',
             'self.device.type == "cpu" and cpu_has_bf16_kernels():',
             ("tests/test_speed_options.py::test_bf16_on_a_cpu_without_bf16_kernels_warns",)),
    Mutation("ssim-one-axis-twice", "the separable SSIM filter applies its vertical factor twice, never the horizontal",
             "dsrdmpd/metrics.py", "g.view(1, 1, 1, size).expand(n, 1, 1, size), padding=(0, padding)",
             "g.view(1, 1, size, 1).expand(n, 1, size, 1), padding=(padding, 0)",
             ("tests/test_evaluation.py::test_ssim_window_applied_as_its_two_factors",
              "tests/test_evaluation.py::test_paper_protocol_against_independent_numpy",
              "tests/test_evaluation.py::test_standard_protocol_against_skimage")),
    # GPU-readiness audit (issue 22): the benchmark keeps what it measured when a case fails
    Mutation("bench-group-rows-lost", "a variant group that fails loses the rows its earlier variants measured",
             "dsrdmpd/benchmark.py", 'raise CaseFailed(f"failed (exit {p.exitcode})", rows) from None',
             'raise CaseFailed(f"failed (exit {p.exitcode})") from None',
             ("tests/test_benchmark.py::test_a_variant_group_keeps_the_rows_measured_before_a_failure",)),
    Mutation("bench-train-case-uncaught", "a training case that fails or runs too long stops the benchmark",
             "dsrdmpd/benchmark.py", "            except CaseFailed as e:\n                records.append(dict(kind=kind,",
             "            except ZeroDivisionError as e:\n                records.append(dict(kind=kind,",
             ("tests/test_benchmark.py::test_a_training_case_past_its_time_limit_becomes_a_row",)),
    Mutation("compile-cache-flag-dropped", "dehaze.py / test.py --compile-cache DIR never reaches the Dehazer",
             "dsrdmpd/cli/options.py", "compile=args.compile, compile_cache=compile_cache)", "compile=args.compile)",
             ("tests/test_training_fast.py::test_compile_cache_option_of_the_commands",)),
    Mutation("usage-error-after-lock", "the Dehazer options' usage errors are not checked before the output folder is made",
             "dsrdmpd/cli/batch.py", "    opts = dehazer_options(args)    # its usage errors", "    opts = {}    # its usage errors",
             ("tests/test_training_fast.py::test_compile_cache_without_compile_leaves_no_output_folder",)),
    # commands answer --help and usage errors before torch loads
    Mutation("parser-imports-torch", "the shared option groups import the inference module (torch) to list the precisions",
             "dsrdmpd/cli/options.py",
             "from ..choices import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UNTILED_PIXELS, PRECISIONS, PROTOCOLS",
             "from ..choices import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UNTILED_PIXELS, PROTOCOLS\nfrom ..inference import PRECISIONS",
             ("tests/test_cli.py::test_help_and_usage_errors_come_before_torch_loads",)),
    Mutation("config-error-is-a-crash", "a bad config key or value exits 1 as a failure, not 2 as bad input",
             "dsrdmpd/cli/errors.py", 'PACKAGE_USER_ERRORS = (("dsrdmpd.config", "ConfigError"), ',
             "PACKAGE_USER_ERRORS = (",
             ("tests/test_cli.py::test_training_errors_name_the_key_or_file",)),
    Mutation("run-stop-reported-as-crash", "a run that stops itself (full disk) is reported as a crash",
             "dsrdmpd/cli/errors.py", 'RUN_ENDED = (("dsrdmpd.evaluation", "RunStopped"),)', "RUN_ENDED = ()",
             ("tests/test_batch_survival.py::test_a_full_disk_ends_the_run_with_one_line",)),
    # raster audit: GeoTIFFs of any band layout (nodata per band, georeferencing by GCPs / RPCs)
    Mutation("raster-nodata-any-band", "a pixel that is nodata in one band is written as nodata in every band",
             "dsrdmpd/raster.py", "                    out[:, ~valid] = values[:, ~valid]\n",
             "                    out[:, ~valid] = values[:, ~valid]\n                    if src.nodata is not None:\n"
             "                        out[:, ~valid] = dtype.type(src.nodata)\n",
             ("tests/test_raster.py::test_nodata_in_one_band_keeps_the_other_bands_values",)),
    Mutation("raster-gcps-dropped", "an input's ground control points are not written to the output",
             "dsrdmpd/raster.py", "        dst.gcps = src.gcps", "        pass",
             ("tests/test_raster.py::test_ground_control_points_and_rpcs_are_kept",)),
    Mutation("raster-rpcs-dropped", "an input's RPCs are not written to the output",
             "dsrdmpd/raster.py", "        dst.rpcs = src.rpcs", "        pass",
             ("tests/test_raster.py::test_ground_control_points_and_rpcs_are_kept",)),
    Mutation("raster-default-domain-only", "tags of metadata domains other than the default one are dropped",
             "dsrdmpd/raster.py", "        if ns not in STRUCTURAL_DOMAINS and not ns.startswith(\"xml:\"):",
             "        if False:", ("tests/test_raster.py::test_tags_of_every_metadata_domain_are_kept",)),
    Mutation("raster-written-band-by-band", "output rows written one band at a time (blocks recompressed per band)",
             "dsrdmpd/raster.py",
             "                    for x0 in range(0, w, OUTPUT_BLOCK):\n"
             "                        cols = Window(x0, y0, min(OUTPUT_BLOCK, w - x0), n)\n",
             "                    for k, b in enumerate(sorted(rgb)):\n"
             "                        dst.write(out[order[k]], out_bands.index(b) + 1, window=win)\n"
             "                    for b in (others if options.keep_other_bands else []):\n"
             "                        dst.write(src.read(b, window=win), out_bands.index(b) + 1, window=win)\n"
             "                    for x0 in []:\n"
             "                        cols = Window(x0, y0, min(OUTPUT_BLOCK, w - x0), n)\n",
             ("tests/test_raster.py::test_many_kept_bands_do_not_bloat_the_output",)),
    Mutation("raster-exact-band-name-ignored", "a band described exactly 'blue' does not win over 'coastal_blue'",
             "dsrdmpd/raster.py", "by_desc.append(exact[0] if len(exact) == 1 else hits[0] if len(hits) == 1 else None)",
             "by_desc.append(hits[0] if len(hits) == 1 else None)",
             ("tests/test_raster.py::test_bands_named_exactly_red_green_blue_win_over_longer_names",)),
    Mutation("scale-infinite-range", "--scale 0,1e400 (an infinite HI) is accepted and maps every value to 0",
             "dsrdmpd/choices.py", "        if not math.isfinite(b - a):", "        if False:",
             ("tests/test_raster.py::test_scale_specs_parse_and_refuse",)),
    Mutation("tiff-palette-as-grey", "a palette TIFF read through imageio gives its indices as grey levels",
             "dsrdmpd/imageio.py", "        if colormap is not None:        # the values are indices",
             "        if False:        # the values are indices",
             ("tests/test_raster.py::test_a_palette_tiff_pair_is_read_in_its_colours",)),
    Mutation("raster-stats-windows-only", "a scene whose statistics windows miss its small valid area is refused as all nodata",
             "dsrdmpd/raster.py", "    if not valid.any():     # the windows missed", "    if False:     # the windows missed",
             ("tests/test_raster.py::test_a_small_valid_area_between_the_statistics_windows_is_found",)),
    # image audit: ordinary images (PNG / JPEG / BMP / plain TIFF) as users meet them
    Mutation("appledouble-as-image", "macOS '._photo.jpg' metadata files are picked up as images (pairing stops the run)",
             "dsrdmpd/choices.py", "                return f.read(4) != APPLEDOUBLE_MAGIC", "                return True",
             ("tests/test_data.py::test_macos_appledouble_files_are_not_images",)),
    Mutation("exif-orientation-ignored", "a rotated phone / drone JPEG is dehazed and written sideways (EXIF orientation ignored)",
             "dsrdmpd/imageio.py", "    if orientation != 1:        # as viewers show it", "    if False:        # as viewers show it",
             ("tests/test_data.py::test_exif_orientation_is_applied_as_viewers_show_it",)),
    Mutation("exif-orientation-transverse", "EXIF orientation 7 (transverse) is turned the wrong way",
             "dsrdmpd/imageio.py", "7: lambda a: a[::-1, ::-1].swapaxes(0, 1)", "7: lambda a: np.rot90(a, 1)[::-1]",
             ("tests/test_data.py::test_exif_orientation_is_applied_as_viewers_show_it",)),
    Mutation("tiff-miniswhite-not-inverted", "a white-is-zero grey TIFF (scans, fax) is read as a negative",
             "dsrdmpd/imageio.py", "            return ((1 << bits) - 1 - arr).astype(arr.dtype)", "            return arr",
             ("tests/test_data.py::test_tiff_photometric_is_read_as_shown",)),
    Mutation("tiff-cmyk-as-rgba", "a CMYK TIFF is read as RGBA: cyan, magenta, yellow taken as red, green, blue",
             "dsrdmpd/imageio.py", "    if photometric in shown or (", "    if True or (",
             ("tests/test_data.py::test_tiff_photometric_is_read_as_shown",)),
    Mutation("tiff-stack-as-rgb", "a TIFF stack of three grey pages is read as one RGB image",
             "dsrdmpd/imageio.py", "        if stacked > 1:                 # its pages", "        if False:                 # its pages",
             ("tests/test_data.py::test_a_tiff_stack_of_grey_pages_is_not_read_as_rgb",)),
    Mutation("png16-sbit-shifted", "a 16-bit PNG with an sBIT chunk (12-bit sensor) is read 16 times too dark",
             "dsrdmpd/imageio.py", "png.Reader(filename=str(path)).read()", "png.Reader(filename=str(path)).asDirect()",
             ("tests/test_data.py::test_a_16bit_png_with_significant_bits_keeps_its_values",)),
    Mutation("conversion-note-lost", "what reading did to an image (EXIF rotation, grey to RGB) is not in summary.md",
             "dsrdmpd/evaluation.py", "    if read.conversion:\n        row[\"converted\"]", "    if False:\n        row[\"converted\"]",
             ("tests/test_evaluation.py::test_rotated_frames_and_conversions_through_test_py",)),
    Mutation("broken-link-vanishes", "an image whose link is broken silently drops out of the run's results",
             "dsrdmpd/choices.py", "not (path.is_file() or (path.is_symlink() and not path.is_dir()))", "not path.is_file()",
             ("tests/test_data.py::test_a_broken_link_fails_by_name_instead_of_vanishing",)),
    Mutation("panel-names-collide", "a.png and a.tif with --panels both write panels/a.png: one panel is lost",
             "dsrdmpd/evaluation.py", "[f\"panels/{panel_name(out)}\"] if k < panels else []", "[]",
             ("tests/test_evaluation.py::test_outputs_that_would_share_a_file_are_refused_before_any_item",)),
    Mutation("message-keeps-line-breaks", "a multi-line error message breaks the one-line stderr line and errors.csv cell",
             "dsrdmpd/messages.py", 'return "; ".join(part.strip() for part in text.splitlines() if part.strip())',
             "return text", ("tests/test_cli.py::test_problems_are_worded_on_one_line_everywhere",)),
    Mutation("case-collision-unasked", "A.png and a.png run into one output file on macOS / Windows: the folder is not asked",
             "dsrdmpd/evaluation.py", "check_output_names(items, panels, ignore_case=ignores_case(out_dir))",
             "check_output_names(items, panels)",
             ("tests/test_evaluation.py::test_names_that_differ_in_case_are_refused_where_the_output_folder_ignores_case",)),
    Mutation("case-collision-compared-as-is", "names that differ in case are compared case-sensitively everywhere",
             "dsrdmpd/evaluation.py", "key = target.lower() if ignore_case else target", "key = target",
             ("tests/test_evaluation.py::test_names_that_differ_in_case_are_refused_where_the_output_folder_ignores_case",)),
    Mutation("png-exif-read-before-data", "an 8-bit PNG whose eXIf chunk follows the image data is read sideways",
             "dsrdmpd/imageio.py",
             "                im.load()           # (a PNG's eXIf chunk after the image data is in .info only now)\n"
             "                orientation = _exif_orientation(im.info.get(\"exif\"))",
             "                orientation = _exif_orientation(im.info.get(\"exif\"))\n                im.load()",
             ("tests/test_data.py::test_exif_after_the_image_data_is_found",)),
    Mutation("png16-exif-stops-at-data", "a 16-bit PNG whose eXIf chunk follows the image data is read sideways",
             "dsrdmpd/imageio.py", 'if kind == b"IEND":\n                    return None',
             'if kind in (b"IEND", b"IDAT"):\n                    return None',
             ("tests/test_data.py::test_exif_after_the_image_data_is_found",)),
    Mutation("cmyk-jpeg-converted-silently", "a print-ready CMYK JPEG is turned into RGB without a word in summary.md",
             "dsrdmpd/imageio.py", "    if colours_from:\n        note =", "    if False:\n        note =",
             ("tests/test_data.py::test_a_cmyk_jpeg_is_read_as_rgb_and_says_so",)),
    Mutation("tiff-planar-guessed", "a small planar RGB TIFF (2 x 2) is misread: the layout guessed from the array's shape",
             "dsrdmpd/imageio.py", "        if planar and arr.ndim == 3:    # samples first", "        if False:    # samples first",
             ("tests/test_data.py::test_a_planar_tiff_of_any_size_is_read_as_rgb",)),
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
