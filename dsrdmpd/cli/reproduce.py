"""Reproduce the paper's tables: evaluate every dataset listed in a suite file and write
one table with our numbers beside the reported ones, their difference and their source,
and other methods beside them: as reported, and scored here where their outputs are given.

    dsrdmpd-reproduce --suite configs/reproduce.yaml --output results/tables \\
        [--set datasets.RSID.root=/data/RSID] [--device cuda] [--peer NAME=DIR ...]

Writes <output>/<dataset>/ (as dsrdmpd-test) and <output>/tables.md + tables.csv.
Reported values come from configs/paper_results.yaml, each with its source, table, the
source's metric protocol and whether it is first-hand, second-hand or unknown.
--peer NAME=DIR scores another method's outputs, DIR/<dataset>/ for each suite dataset
(named as in the suite), with dsrdmpd-score against the same ground truth under the
same protocol as ours (into <output>/peers/NAME/<dataset>/). Datasets whose folders or
checkpoints are missing are skipped with a note. A dataset (or a peer's folder) that
fails is noted in its row and the table is still written; the exit code is then 1.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..atomicfile import write_text_atomic
from ..choices import PROTOCOLS
from ..config import did_you_mean, load_config
from . import evaluate
from ..messages import one_line
from .errors import ItemsFailed, UsageError, run_command
from .options import parser
from .score import check_output_folder

ROOT = Path(__file__).resolve().parents[2]
# suite key -> dsrdmpd-test option
DATASET_OPTIONS = {"preset": "--preset", "root": "--data-root", "split": "--split", "list_file": "--list-file",
                   "hazy_dir": "--hazy-subdir", "gt_dir": "--gt-subdir", "hazy_key": "--hazy-key",
                   "gt_key": "--gt-key", "resize": "--resize"}
SUITE_KEYS = ("protocol", "seed", "weights", "datasets", "peers")
DATASET_KEYS = (*DATASET_OPTIONS, "stage1", "stage2")
FIELDS = ["dataset", "psnr", "ssim", "reported_psnr", "reported_ssim", "diff_psnr", "diff_ssim", "source",
          "checked_against_paper", "hand", "reported_protocol", "psnr_stage1", "ssim_stage1", "note"]
HANDS = ("first-hand", "second-hand", "unknown")


def load_means(folder: Path) -> dict:
    from ..evaluation import mean_metrics
    with open(folder / "metrics.csv") as f:
        return mean_metrics(list(csv.DictReader(f)))


def hand_of(ref: Dict[str, Any]) -> str:
    """'first-hand' / 'second-hand' / 'unknown' (the ``hand`` field; older files: from
    ``checked_against_paper``; 'unknown' where no value was reported)."""
    if not ref.get("source"):
        return "unknown"
    hand = ref.get("hand") or ("first-hand" if ref.get("checked_against_paper") else "second-hand")
    if hand not in HANDS:
        raise UsageError(f"paper results: hand {hand!r} is not one of {', '.join(HANDS)}")
    return hand


def source_label(ref: Dict[str, Any]) -> str:
    """'EM-SNN, Table 2 (second-hand)' / '' when no value was reported."""
    if not ref.get("source"):
        return ""
    label = str(ref["source"]) + (f", {ref['table']}" if ref.get("table") else "")
    return label + (" (second-hand)" if hand_of(ref) == "second-hand" else "")


def source_protocol(paper: Dict[str, Any], ref: Dict[str, Any]) -> str:
    """The metric protocol of the source a value was read in ('unknown' where not stated)."""
    if not ref.get("source"):
        return ""
    return str(((paper.get("sources") or {}).get(ref["source"]) or {}).get("protocol") or "unknown")


def table_row(name: str, ours: Dict[str, float], ref: Dict[str, Any], note: str,
              paper: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One dataset's row: ours, reported, ours - reported (None where either is missing)."""
    diff = lambda a, b: None if a is None or b is None else a - b
    psnr, ssim = ours.get("psnr_stage2"), ours.get("ssim_stage2")
    return {"dataset": name, "psnr": psnr, "ssim": ssim, "reported_psnr": ref.get("psnr"),
            "reported_ssim": ref.get("ssim"), "diff_psnr": diff(psnr, ref.get("psnr")),
            "diff_ssim": diff(ssim, ref.get("ssim")), "source": source_label(ref),
            "checked_against_paper": hand_of(ref) == "first-hand" if ref.get("source") else None,
            "hand": hand_of(ref), "reported_protocol": source_protocol(paper or {}, ref),
            "psnr_stage1": ours.get("psnr_stage1"), "ssim_stage1": ours.get("ssim_stage1"),
            "note": note or ref.get("note", ""), "scored": {}}


def average_rows(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows for the reported averages (``average_of`` in paper_results.yaml) whose parts
    are all in the suite: ours (and each scored peer) as the mean of the parts' means,
    None when a part has no value."""
    by_name = {r["dataset"]: r for r in rows}
    out = []
    for name, ref in (paper.get("datasets") or {}).items():
        parts = ref.get("average_of")
        if not parts or not all(p in by_name for p in parts):
            continue
        mean = lambda values: None if any(v is None for v in values) else sum(values) / len(values)
        ours = {k: mean([by_name[p][col] for p in parts]) for k, col in
                (("psnr_stage2", "psnr"), ("ssim_stage2", "ssim"), ("psnr_stage1", "psnr_stage1"),
                 ("ssim_stage1", "ssim_stage1"))}
        row = table_row(name, {k: v for k, v in ours.items() if v is not None}, ref,
                        "mean of " + ", ".join(parts), paper)
        peers = {m for p in parts for m in by_name[p]["scored"]}
        for m in sorted(peers):
            cells = [by_name[p]["scored"].get(m, {}) for p in parts]
            row["scored"][m] = {k: mean([c.get(k) for c in cells]) for k in ("psnr", "ssim")}
        out.append(row)
    return out


def signed(x: Optional[float], digits: int) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def pair_cell(psnr: Optional[float], ssim: Optional[float]) -> str:
    from ..evaluation import fmt
    return f"{fmt(psnr, 2)} / {fmt(ssim, 4)}" if psnr is not None else ""


def write_tables(rows: List[Dict[str, Any]], paper: Dict[str, Any], out: Path, protocol: str,
                 origin: Sequence[str] = ()) -> str:
    """tables.csv (one row per dataset) and tables.md (ours | reported | difference |
    source | scored peers, the protocol of every column, where our numbers came from
    (``origin`` lines), the sources, then the other methods: as reported, and as scored
    here); returns the markdown."""
    from ..evaluation import fmt
    scored = sorted({m for r in rows for m in r.get("scored", {})})
    buf = io.StringIO()
    fields = FIELDS + [f"{m}_{k}_scored" for m in scored for k in ("psnr", "ssim")]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        flat = {**r, **{f"{m}_{k}_scored": v for m, cell in r.get("scored", {}).items() for k, v in cell.items()}}
        w.writerow({k: ("" if flat.get(k) is None else flat[k]) for k in fields})
    write_text_atomic(out / "tables.csv", buf.getvalue())
    ours_protocol = PROTOCOLS[protocol]
    heads = ["dataset", "PSNR ours", "SSIM ours", "PSNR reported", "SSIM reported", "PSNR diff", "SSIM diff",
             "reported in", "stage 1 PSNR / SSIM (ours)", "note", "protocol of the reported value"]
    heads += [f"{m} PSNR / SSIM (scored here)" for m in scored]
    lines = ["# DS-RDMPD: our results beside the reported ones", "", f"Metric protocol (ours): {ours_protocol}.", "",
             "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for r in rows:
        s1 = pair_cell(r["psnr_stage1"], r["ssim_stage1"])
        cells = [r["dataset"], fmt(r["psnr"], 2), fmt(r["ssim"], 4), fmt(r["reported_psnr"], 2),
                 fmt(r["reported_ssim"], 4), signed(r["diff_psnr"], 2), signed(r["diff_ssim"], 4), r["source"], s1,
                 r["note"], r.get("reported_protocol", "")]
        cells += [pair_cell(r["scored"].get(m, {}).get("psnr"), r["scored"].get(m, {}).get("ssim"))
                  for m in scored]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Protocol of every column:", "",
              f"- PSNR / SSIM ours, stage 1 (ours){''.join(f', {m} (scored here)' for m in scored)}: "
              f"scored by this package on the same ground truth, {ours_protocol}.",
              "- PSNR / SSIM reported: as printed in the source named under 'reported in', under that source's "
              "protocol ('protocol of the reported value'; unknown where the source does not state it). "
              "diff = ours - reported, so it mixes protocols where they differ.",
              "- '(second-hand)': read in another paper that reports the method, not in the method's own paper "
              "(for DS-RDMPD: not in the DS-RDMPD paper itself); an empty reported cell: no value known."]
    lines += ["", "Where the numbers come from:", "", *origin] if origin else []
    used = sorted({str(ref.get("source")) for group in [paper.get("datasets") or {}, *(paper.get("peers") or {})
                                                        .values()] for ref in group.values() if ref.get("source")})
    if used:
        lines += ["", "Sources of the reported values:"]
        for key in used:
            src = (paper.get("sources") or {}).get(key, {})
            lines.append(f"- {key}: {' '.join(str(src.get('citation', key)).split())}"
                         + (f" Protocol: {src['protocol']}." if src.get("protocol") else "")
                         + (f" {' '.join(str(src['protocol_notes']).split())}" if src.get("protocol_notes") else ""))
    peers = paper.get("peers") or {}
    if peers or scored:
        names = [r["dataset"] for r in rows]
        lines += ["", "Other methods (PSNR / SSIM): as reported, and as scored here from their outputs:", "",
                  "| method | " + " | ".join(names) + " | source (protocol) |", "|---" * (len(names) + 2) + "|"]
        for method, values in peers.items():
            cells = [pair_cell(values[n].get("psnr"), values[n].get("ssim")) if n in values else "" for n in names]
            labels = sorted({f"{source_label(v)}; protocol {source_protocol(paper, v)}"
                             for v in values.values() if v.get("source")})
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {'; '.join(labels)} |")
        by_name = {r["dataset"]: r for r in rows}
        for m in scored:
            cells = [pair_cell(by_name[n]["scored"].get(m, {}).get("psnr"), by_name[n]["scored"].get(m, {}).get("ssim"))
                     for n in names]
            lines.append(f"| {m} (scored here) | " + " | ".join(cells) + f" | dsrdmpd-score; {ours_protocol} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "tables.md", text)
    return text


def parse_peers(items: Sequence[str]) -> Dict[str, Path]:
    """['NAME=DIR', ...] -> {NAME: DIR}."""
    peers = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UsageError(f"--peer {item!r}: expected NAME=DIR (DIR holding one folder per dataset)")
        peers[name.strip()] = Path(folder.strip())
    return peers


def unknown_key(kind: str, key: str, known: Sequence[str]) -> str:
    """"unknown setting 'rot' (did you mean root?); known: preset, root, ..."."""
    return f"unknown {kind} {key!r}{did_you_mean(key, known)}; known: {', '.join(map(str, known)) or 'none'}"


def check_suite(path: str, suite: Dict[str, Any], overrides: Sequence[str]) -> None:
    """Refuse, naming the file or the ``--set``, what the suite would otherwise take quietly:
    a misspelt top-level or dataset key (ignored), or ``--set datasets.NAME...`` for a NAME
    the suite file does not list (it would add a dataset of one setting: datasets are
    added in the suite file)."""
    for key in suite:
        if key not in SUITE_KEYS:
            raise UsageError(f"{path}: {unknown_key('suite key', key, SUITE_KEYS)}")
    datasets = suite.get("datasets") or {}
    if not isinstance(datasets, dict):
        raise UsageError(f"{path}: 'datasets' must map each dataset's name to its settings")
    for name, ds in datasets.items():
        if not isinstance(ds, dict):
            raise UsageError(f"{path}: dataset {name}: expected its settings (root, stage1, stage2, ...), got {ds!r}")
        for key in ds:
            if key not in DATASET_KEYS:
                raise UsageError(f"{path}: dataset {name}: {unknown_key('setting', key, DATASET_KEYS)}")
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if parts[0] not in SUITE_KEYS:
            raise UsageError(f"--set {item}: {unknown_key('suite key', parts[0], SUITE_KEYS)}")
        if parts[0] != "datasets" or len(parts) < 2:
            continue
        if parts[1] not in datasets:
            raise UsageError(f"--set {item}: {path} lists no dataset {parts[1]!r}{did_you_mean(parts[1], datasets)}"
                             f"; it lists: {', '.join(datasets) or 'none'} (add a new dataset in the suite file)")
        if len(parts) != 3 or parts[2] not in DATASET_KEYS:
            raise UsageError(f"--set {item}: " + (unknown_key("setting", parts[2], DATASET_KEYS) if len(parts) == 3
                             else f"expected datasets.{parts[1]}.SETTING=VALUE"))


def check_peer_folders(peers: Dict[str, Path], datasets: Sequence[str]) -> None:
    """A peer folder that is missing, or holds a folder for none of the suite's datasets, is
    a UsageError naming what it holds (before any dataset is evaluated)."""
    for name, folder in peers.items():
        if not folder.is_dir():
            raise UsageError(f"peer {name}: folder not found: {folder}")
        if not any((folder / d).is_dir() for d in datasets):
            held = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise UsageError(f"peer {name}: {folder} holds no folder named as a suite dataset "
                             f"({', '.join(datasets) or 'none in the suite'}); "
                             f"it holds: {', '.join(held[:10]) or 'no folder'}")


def score_peer(name: str, folder: Path, dataset: str, ds: Dict[str, Any], protocol: str,
               out: Path) -> Dict[str, Any]:
    """Score one method's outputs for one dataset (``folder``/``dataset``) against the
    dataset's ground truth under ``protocol``: {'psnr', 'ssim'} or {'note'} (why not)."""
    from ..data import split_pairs
    from ..scoring import score_folder
    outputs = folder / dataset
    if not outputs.is_dir():
        return {}
    try:
        refs = split_pairs(ds, ds.get("split", "test"))
        means, failed = score_folder(outputs, refs, out / "peers" / name / dataset, [protocol],
                                     resize=ds.get("resize"), title=f"{name} on {dataset}", progress=False)
    except Exception as exc:          # a peer that cannot be scored is noted; the table goes on
        return {"note": f"{name} not scored: {one_line(exc)}"}
    cell = {"psnr": means.get(f"psnr_{protocol}"), "ssim": means.get(f"ssim_{protocol}"),
            "images": len(refs) - len(failed)}
    if failed:
        cell["note"] = f"{name}: {len(failed)} pair(s) not scored (see peers/{name}/{dataset}/summary.md)"
    return cell


def run(argv: Optional[List[str]] = None) -> List[dict]:
    ap = parser("dsrdmpd-reproduce", __doc__)
    ap.add_argument("--suite", default=str(ROOT / "configs" / "reproduce.yaml"),
                    help="datasets with their folders and checkpoints, the protocol, seed and weights")
    ap.add_argument("--paper", default=str(ROOT / "configs" / "paper_results.yaml"),
                    help="the reported values, each with its source, table, protocol and hand")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a suite setting, e.g. datasets.RSID.root=/data/RSID (repeatable)")
    ap.add_argument("--output", required=True, type=Path,
                    help="folder for tables.md, tables.csv, <dataset>/ and peers/")
    ap.add_argument("--device", default="auto", help="as dsrdmpd-test --device")
    ap.add_argument("--config", help="model config for every dataset (without it: sizes read off the checkpoints)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=DIR",
                    help="another method's outputs, DIR/<dataset>/ per suite dataset, scored as ours")
    args = ap.parse_args(argv)
    check_suite(args.suite, load_config(args.suite, defaults={}), args.overrides)
    suite = load_config(args.suite, args.overrides, defaults={})
    paper = load_config(args.paper, defaults={})
    protocol = suite.get("protocol", "paper")
    if protocol not in PROTOCOLS:
        raise UsageError(f"{args.suite}: protocol {protocol!r} is not one of {', '.join(sorted(PROTOCOLS))}")
    if not suite.get("datasets"):
        raise UsageError(f"{args.suite}: no datasets listed (expected a 'datasets:' mapping of name -> settings)")
    peers = {**{k: Path(v) for k, v in (suite.get("peers") or {}).items()}, **parse_peers(args.peer)}
    check_output_folder(args.output)
    check_peer_folders(peers, list(suite.get("datasets") or {}))
    check_dataset_values(args.suite, suite, protocol, args)
    rows, problems, evaluated = [], [], {}
    for name, ds in (suite.get("datasets") or {}).items():
        missing = [k for k in ("root", "stage1", "stage2") if not ds.get(k) or not Path(ds[k]).exists()]
        ours: Dict[str, float] = {}
        if missing:
            note = "skipped: not found: " + ", ".join(f"{k}={ds.get(k)}" for k in missing)
            print(f"{name}: {note}")
        else:
            cli = dataset_cli(name, ds, suite, protocol, args)
            note = f"{ds.get('split', 'test')} split" + (f", resized to {ds['resize']}" if ds.get("resize") else "")
            try:
                ours = evaluate.run(cli)
                evaluated[name] = (ds["stage1"], ds["stage2"])
            except ItemsFailed as exc:
                ours = load_means(args.output / name)
                evaluated[name] = (ds["stage1"], ds["stage2"])
                note += f"; {one_line(exc)}"
                problems.append(name)
            except Exception as exc:          # one dataset that cannot be evaluated is noted; the table goes on
                note = f"failed: {one_line(exc)}"
                print(f"{name}: {note}")
                problems.append(name)
        row = table_row(name, ours, (paper.get("datasets") or {}).get(name, {}), note, paper)
        for peer, folder in peers.items():
            cell = score_peer(peer, folder, name, ds, protocol, args.output)
            if cell.get("note"):
                problems.append(f"{peer} on {name}")
                row["note"] = "; ".join(n for n in (row["note"], cell.pop("note")) if n)
            if cell:
                row["scored"][peer] = cell
        rows.append(row)
    rows += average_rows(rows, paper)
    origin = (ours_origin(evaluated, suite, args.output) or ["- ours: none (no dataset was evaluated)"]) + [
        f"- {m} on {r['dataset']}: {cell['images']} image(s) scored here with `dsrdmpd-score`; per image in "
        f"`peers/{m}/{r['dataset']}/metrics.csv`" for r in rows for m, cell in r["scored"].items() if "images" in cell]
    print(write_tables(rows, paper, args.output, protocol, origin))
    if problems:
        raise ItemsFailed(f"{len(problems)} of the table's entries had problems ({', '.join(problems[:5])}"
                          f"{' ...' if len(problems) > 5 else ''}): see the notes in {args.output / 'tables.md'}")
    return rows


def scored_count(folder: Path) -> Optional[int]:
    """How many images ``folder``/metrics.csv scores (None without the file)."""
    try:
        with open(folder / "metrics.csv") as f:
            return sum(1 for r in csv.DictReader(f) if r.get("psnr_stage2"))
    except OSError:
        return None


def ours_origin(evaluated: Dict[str, tuple], suite: Dict[str, Any], out: Path) -> List[str]:
    """Where each of our numbers came from: one line per evaluated dataset (checkpoints,
    weights, seed, how many images, per-image results); [] when none was evaluated."""
    lines = []
    for name, (s1, s2) in evaluated.items():
        n = scored_count(out / name)
        lines.append(f"- {name}: `dsrdmpd-test` with stage 1 `{s1}`, stage 2 `{s2}` (weights "
                     f"{suite.get('weights', 'model')}, seed {suite.get('seed', 0)}); "
                     + (f"{n} image(s) scored, " if n is not None else "") + f"per image in `{name}/metrics.csv`")
    return lines


def dataset_cli(name: str, ds: Dict[str, Any], suite: Dict[str, Any], protocol: str, args) -> List[str]:
    """The dsrdmpd-test arguments that evaluate dataset ``name`` of the suite."""
    cli = ["--stage1", str(ds.get("stage1")), "--stage2", str(ds.get("stage2")), "--output", str(args.output / name),
           "--protocol", protocol, "--device", args.device, "--weights", str(suite.get("weights", "model")),
           "--seed", str(suite.get("seed", 0))]
    for key, option in DATASET_OPTIONS.items():
        if ds.get(key) is not None:
            cli += [option, str(ds[key])]
    return cli + (["--config", args.config] if args.config else [])


def check_dataset_values(path, suite: Dict[str, Any], protocol: str, args) -> None:
    """Every dataset's settings read as dsrdmpd-test reads them, before any dataset runs: a
    value it refuses (resize 0, a key rule that is no regular expression, weights 'emma') is a
    UsageError naming the suite file, the dataset and the problem, not an exit halfway through."""
    def refuse(message: str):
        raise UsageError(f"{path}: dataset {name}: {message}")
    ap = evaluate.build_parser()
    ap.error = refuse
    for name, ds in (suite.get("datasets") or {}).items():
        ap.parse_args(dataset_cli(name, ds, suite, protocol, args))


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argv)
