"""The benchmark report: every setting's table next to the paper's numbers, and the paper's claims judged.

``write_bench_report`` rebuilds ``report.md`` (and ``figures/claims_<suite>.png``) from results alone, in
either layout (:class:`BenchLayout`): a ``paramtransfer bench`` output (``OUT/<suite>/<name>/``) or the
recorded ``benchmarks/`` folder (``benchmarks/<suite>/results/<name>/``). Each setting's section comes
from its kind's renderer (:func:`paramtransfer.bench.suites.get_kind`; ``compare`` settings:
:func:`paramtransfer.bench.compare.render_compare`). The verdict rule is in :mod:`paramtransfer.bench.paper`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramtransfer.bench.paper import (
    VERDICT_RULE,
    VERDICTS,
    ClaimResult,
    load_paper,
)
from paramtransfer.bench.suites import (
    DEFAULT_OUT,
    MANIFEST,
    PAPER_FILE,
    default_suites_root,
    get_kind,
    list_suites,
    setting_kind,
    suite_settings,
)
from paramtransfer.bench.summaries import write_suite_summary
from paramtransfer.errors import UserError
from paramtransfer.report import load_results
from paramtransfer.report.tables import best_ft, label, pct
from paramtransfer.train.checkpoint import atomic_write_bytes

REPORT = "report.md"
FIGURES = "figures"
_EMBED_SKIP = ("learning_curves.png",)  # large, and not a paper figure: linked, not shown inline


@dataclass
class BenchLayout:
    """Where results are: ``root/<suite>/<name>/`` (a bench output) or, with ``recorded``,
    ``root/<suite>/results/<name>/`` (the benchmarks folder). ``suites`` holds the setting YAMLs and
    ``paper.yaml`` files (None: unknown, only the results are listed)."""

    root: Path
    suites: Path | None
    recorded: bool = False

    def results_dir(self, suite: str, name: str) -> Path:
        return self.root / suite / "results" / name if self.recorded else self.root / suite / name

    def speed_json(self) -> Path:
        return self.root / "speed" / "results.json"

    def suite_names(self) -> list[str]:
        names = set(list_suites(self.suites)) if self.suites is not None and self.suites.is_dir() else set()
        pattern = "*/results/*/results.json" if self.recorded else "*/*/results.json"
        names |= {p.relative_to(self.root).parts[0] for p in self.root.glob(pattern)}
        return sorted(names - {"speed", FIGURES})

    def setting_names(self, suite: str, first: list[str] | None = None) -> list[str]:
        """``first`` (paper.yaml's order) that exist, then every other setting or result, by name."""
        known = set(suite_settings(self.suites, suite)) if self.suites is not None else set()
        base = self.root / suite / "results" if self.recorded else self.root / suite
        known |= {p.parent.name for p in base.glob("*/results.json")}
        ordered = [n for n in first or [] if n in known]
        return ordered + sorted(known - set(ordered))


@dataclass
class BenchReport:
    path: Path
    counts: dict[str, Counter]  # suite -> verdict -> claims
    ran: dict[str, tuple[int, int]]  # suite -> (settings with results, settings)
    summary: str  # the report's summary table (markdown)


def detect_layout(directory: str | Path, suites: str | Path | None = None) -> BenchLayout | None:
    """The layout of ``directory`` if it holds bench results (or is a benchmarks folder), else None."""
    d = Path(directory)
    if any(d.glob(f"*/{PAPER_FILE}")) or any(d.glob("*/results/*/results.json")):
        return BenchLayout(d, Path(suites) if suites else d, recorded=True)
    if (d / MANIFEST).is_file() or any(d.glob("*/*/results.json")):
        root = Path(suites) if suites else None
        if root is None and (d / MANIFEST).is_file():
            recorded_root = Path(json.loads((d / MANIFEST).read_text()).get("suites", ""))
            root = recorded_root if recorded_root.is_dir() else None
        if root is None and default_suites_root().is_dir():
            root = default_suites_root()
        return BenchLayout(d, root, recorded=False)
    return None


# ---- one compare setting ---------------------------------------------------------------------------


# ---- the whole report ------------------------------------------------------------------------------


def _command(suite: str, name: str, layout: BenchLayout) -> str:
    cmd = f"paramtransfer bench {suite}/{name}" if name else f"paramtransfer bench {suite}"
    if layout.suites is not None and layout.suites.resolve() != default_suites_root().resolve():
        cmd += f" --suites {layout.suites}"
    if layout.recorded:
        cmd += " --record"
    elif layout.root.resolve() != Path(DEFAULT_OUT).resolve():
        cmd += f" --out {layout.root}"
    return cmd


def _figure_markdown(figures: list[Path], out: Path, prefix: str) -> str:
    """Figures linked where they are when under ``out``, else copied to ``out/figures``."""
    shown, linked = [], []
    for fig in figures:
        if fig.resolve().is_relative_to(out.resolve()):
            rel = Path(os.path.relpath(fig.resolve(), out.resolve())).as_posix()
        else:
            copy = out / FIGURES / f"{prefix}_{fig.name}"
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fig, copy)
            rel = f"{FIGURES}/{copy.name}"
        if fig.name in _EMBED_SKIP:
            linked.append(f"[{fig.stem}]({rel})")
        else:
            shown.append(f"![{prefix}: {fig.stem}]({rel})")
    return "\n\n".join(shown + linked)


def _load_summary(results_dir: Path) -> dict[str, Any]:
    summary = json.loads((results_dir / "results.json").read_text())
    if "selected" not in summary and "runs" in summary:
        summary = load_results(results_dir)
    return summary


def write_bench_report(layout: BenchLayout, out: str | Path | None = None) -> BenchReport:
    """Write ``report.md`` (+ ``figures/claims_<suite>.png``) for every suite of ``layout`` into ``out``
    (default: ``layout.root``); never runs anything. Settings without results say "not run"."""
    out = Path(out) if out is not None else layout.root
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Counter] = {}
    margins: list[str] = []
    ran: dict[str, tuple[int, int]] = {}
    titles: dict[str, str] = {}
    body: list[str] = []
    for suite in layout.suite_names():
        paper = load_paper(layout.suites / suite / PAPER_FILE) if layout.suites is not None else {}
        entries: dict[str, Any] = paper.get("settings") or {}
        titles[suite] = str(paper.get("paper", ""))
        names = layout.setting_names(suite, list(entries))
        done = [n for n in names if (layout.results_dir(suite, n) / "results.json").is_file()]
        ran[suite] = (len(done), len(names))
        counts[suite] = Counter()
        if not done:
            continue
        sections, overview, claims_of = [], [], []
        for name in names:
            entry = entries.get(name)
            rdir = layout.results_dir(suite, name)
            heading = f"### {suite}/{name}"
            if name not in done:
                mirrors = f"Paper: {entry['mirrors']}.\n\n" if entry and entry.get("mirrors") else ""
                cmd = _command(suite, name, layout)
                sections.append(f"{heading}\n\n{mirrors}**Not run.** Run it with `{cmd}`.")
                overview.append(f"| {name} | {(entry or {}).get('mirrors', '—')} | not run | | | |")
                continue
            kind = setting_kind(layout.suites, suite, name)
            try:
                results = _load_summary(rdir)
            except (json.JSONDecodeError, UserError) as err:
                cmd = _command(suite, name, layout)
                sections.append(f"{heading}\n\n**Unreadable results** ({err}). Run it again with `{cmd}`.")
                overview.append(f"| {name} | {(entry or {}).get('mirrors', '—')} | unreadable | | | |")
                continue
            try:
                renderer = get_kind(kind).render
            except UserError as err:
                sections.append(f"{heading}\n\n**Cannot render** this setting: {err}.")
                overview.append(f"| {name} | {(entry or {}).get('mirrors', '—')} | cannot render | | | |")
                continue
            section = renderer(results, entry, rdir)
            margins += _margin_row(f"{suite}/{name}", results)
            tally = Counter(c.verdict for c in section.claims)
            counts[suite] += tally
            claims_of += [(name, c) for c in section.claims]
            figures = _figure_markdown(section.figures, out, f"{suite}_{name}")
            sections.append("\n\n".join(p for p in (heading, section.markdown, figures) if p))
            overview.append(
                f"| {name} | {(entry or {}).get('mirrors', '—')} | {tally['agree']} | {tally['disagree']} | "
                f"{tally['inconclusive']} | {tally['missing']} |"
            )
        if paper.get("summary") and layout.suites is not None:  # a table over the suite's settings
            write_suite_summary(
                paper["summary"],
                lambda name, suite=suite: layout.results_dir(suite, name),
                out / suite / "results" if layout.recorded else out / suite,
                str(layout.suites / suite / PAPER_FILE),
            )
        head = f"## {suite}" + (f" — {titles[suite]}" if titles[suite] else "")
        intro = [head, ""]
        if paper.get("file"):
            intro += [f"Paper: `{paper['file']}` (in the shared papers folder).", ""]
        intro += [
            "| setting | mirrors | agree | disagree | inconclusive | missing |",
            "|---|---|---|---|---|---|",
            *overview,
        ]
        figure = plot_claims(claims_of, out / FIGURES / f"claims_{suite}.png", suite)
        if figure is not None:
            intro += ["", f"![{suite}: our difference per claim]({FIGURES}/{figure.name})"]
        body.append("\n".join(intro) + "\n\n" + "\n\n".join(sections))
    summary = _summary_table(counts, ran, titles, layout)
    speed = _speed_part(layout)
    text = "\n\n".join([_header(), summary, _margin_table(margins), *body, speed]).rstrip() + "\n"
    path = out / REPORT
    atomic_write_bytes(path, text.encode())
    return BenchReport(path, counts, ran, summary)


def _margin_row(where: str, results: dict[str, Any]) -> list[str]:
    """One row of the transfer-margin table for a setting that ran scratch and fine-tuning (else none)."""
    selected = results.get("selected") or {}
    scratch, best = selected.get("scratch"), best_ft(selected)
    if not scratch or scratch.get("status") != "ok" or best is None:
        return []
    cfg = results.get("config") or {}
    n = min(scratch.get("n_seeds") or 0, best[1].get("n_seeds") or 0)
    margin = 100 * (best[1]["test_mean"] - scratch["test_mean"])
    cells = [
        where,
        f"{cfg.get('source')} → {cfg.get('target')}",
        str(cfg.get("arch")),
        str(cfg.get("shots") or "all"),
        pct(scratch["test_mean"], scratch["test_std"], n),
        f"{label(best[0])}: {pct(best[1]['test_mean'], best[1]['test_std'], n)}",
        f"{margin:+.2f}",
    ]
    return ["| " + " | ".join(cells) + " |"]


def _margin_table(rows: list[str]) -> str:
    """How much room each setting's source leaves the methods: the best FT-l (l chosen on validation)
    over training from scratch, every setting side by side (the LeNet settings next to the ImageNet
    ones)."""
    if not rows:
        return ""
    head = [
        "## How much the source helps: best FT-l over scratch",
        "",
        "Test accuracy (%, mean ± std over seeds) of training the architecture from scratch and of the best "
        "FT-l (l chosen on validation) per setting; the margin is the room a source leaves for any transfer "
        "method to show its effect.",
        "",
        "| setting | source → target | arch | shots | scratch | best FT-l | margin (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def _header() -> str:
    return "\n".join(
        [
            "# Benchmarks next to the papers",
            "",
            "Every setting's table beside the paper's numbers, and the paper's claims checked on our "
            "results. Our data (Fashion-MNIST halves, scikit-learn digits) and networks are far smaller "
            "than the papers', so absolute accuracies differ and are shown side by side only; agreement "
            "is judged on the claims (who beats whom). Δ columns are test-accuracy points against the "
            "setting's fine-tuning reference. This file is rebuilt from the results alone by "
            "`paramtransfer report DIR` (DIR: this folder).",
            "",
            f"Verdicts. {VERDICT_RULE}",
        ]
    )


def _summary_table(
    counts: dict[str, Counter], ran: dict[str, tuple[int, int]], titles: dict[str, str], layout: BenchLayout
) -> str:
    lines = [
        "| suite | paper | settings run | agree | disagree | inconclusive | missing |",
        "|---|---|---|---|---|---|---|",
    ]
    total: Counter = Counter()
    for suite in counts:
        done, of = ran[suite]
        total += counts[suite]
        if not done:
            run = f"not run: `{_command(suite, '', layout)}`"
            lines.append(f"| {suite} | {titles[suite] or '—'} | {run} | | | | |")
            continue
        c = counts[suite]
        lines.append(
            f"| {suite} | {titles[suite] or '—'} | {done} of {of} | "
            + " | ".join(str(c[v]) for v in VERDICTS)
            + " |"
        )
    done = sum(d for d, _ in ran.values())
    of = sum(n for _, n in ran.values())
    lines.append(f"| **all** | | {done} of {of} | " + " | ".join(f"**{total[v]}**" for v in VERDICTS) + " |")
    return "## Summary\n\n" + "\n".join(lines)


# ---- figures ---------------------------------------------------------------------------------------


_COLOURS = {"agree": "#2e7d32", "disagree": "#c62828", "inconclusive": "#9e9e9e", "missing": "#ffffff"}


def plot_claims(claims: list[tuple[str, ClaimResult]], path: Path, title: str) -> Path | None:
    """One bar per claim: our difference (better − worse, points) with ± the noise, coloured by
    verdict; a black diamond marks the paper's difference where both sides have paper numbers."""
    rows = [(name, c) for name, c in claims if c.diff is not None]
    if not rows:
        return None
    from paramtransfer.report.plots import plt, save_figure  # matplotlib with the Agg backend

    n = len(rows)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * n))
    ys = list(range(n))[::-1]
    for y, (_, c) in zip(ys, rows):
        ax.barh(
            y, c.diff, xerr=c.noise, color=_COLOURS[c.verdict], edgecolor="black", linewidth=0.3, capsize=2
        )
        if c.paper_diff is not None:
            ax.plot(c.paper_diff, y, marker="D", color="black", markersize=4)
    labels = [f"{name}: {c.text}" for name, c in rows]
    ax.set_yticks(ys, [t if len(t) <= 80 else t[:77] + "..." for t in labels], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("better − worse, test accuracy points (ours: bar ± noise; paper: ◆)")
    ax.set_title(f"{title}: the papers' claims on our results")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLOURS[v]) for v in ("agree", "disagree", "inconclusive")]
    ax.legend(handles, ["agree", "disagree", "inconclusive"], fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=100)


# ---- speed -----------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _speed_part(layout: BenchLayout) -> str:
    path = layout.speed_json()
    if not path.is_file():
        cmd = "paramtransfer bench speed" + (" --record" if layout.recorded else "")
        return f"## speed\n\nNot run. Run it with `{cmd}` (on an otherwise idle machine)."
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return f"## speed\n\n`{path.name}` is not valid JSON ({err}); run `paramtransfer bench speed` again."
    return speed_section(data if isinstance(data, dict) else {})


def speed_section(data: dict[str, Any]) -> str:
    """Targets met or not, then per architecture every method's cost next to fine-tuning's (defensive:
    any key may be missing)."""
    out = ["## speed", ""]
    meta = [
        f"{k} {data[k]}" for k in ("date", "torch", "threads", "batch", "repeats") if data.get(k) is not None
    ]
    load = data.get("load_average")
    if isinstance(load, list) and len(load) == 2:
        meta.append(f"load average {_num(load[0])} → {_num(load[1])}")
    if meta:
        out += ["Measured with " + ", ".join(meta) + ".", ""]
    targets = data.get("targets")
    if isinstance(targets, dict) and targets:
        out += ["| target | limit | measured | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            t = t if isinstance(t, dict) else {"value": t}
            limit = f"{t.get('op', '')} {t.get('limit', t.get('target', '—'))}".strip()
            values = t.get("values", t.get("value"))
            if isinstance(values, dict):
                measured = ", ".join(f"{k} {_num(v)}" for k, v in values.items()) or "—"
            else:
                measured = _num(values)
            met = {True: "yes", False: "**no**"}.get(t.get("met"), "—")
            out.append(f"| {name} | {limit} | {measured} | {met} |")
        out.append("")
    steps = data.get("train_step_ratio") if isinstance(data.get("train_step_ratio"), dict) else {}
    evals = data.get("eval_ratio") if isinstance(data.get("eval_ratio"), dict) else {}
    ms = data.get("train_step_ms") if isinstance(data.get("train_step_ms"), dict) else {}
    rss = data.get("peak_rss_mb") if isinstance(data.get("peak_rss_mb"), dict) else {}
    for arch in sorted(set(steps) | set(evals)):
        s, e = steps.get(arch) or {}, evals.get(arch) or {}
        m, r = ms.get(arch) or {}, rss.get(arch) or {}
        out += [
            f"{arch}: cost next to fine-tuning (ratios; 1 = as fast as `finetune`)",
            "",
            "| method | train step (ms) | train step × fine-tuning | evaluation × fine-tuning "
            "| peak RSS (MB) |",
            "|---|---|---|---|---|",
        ]
        if "finetune" in m or "finetune" in r:
            out.append(
                f"| finetune | {_num(m.get('finetune'), '.1f')} | 1 | 1 | {_num(r.get('finetune'), '.0f')} |"
            )
        for method in sorted(set(s) | set(e)):
            out.append(
                f"| {method} | {_num(m.get(method), '.1f')} | {_num(s.get(method))} | "
                f"{_num(e.get(method))} | {_num(r.get(method), '.0f')} |"
            )
        out.append("")
    dtnh = data.get("dtnh_over_base")
    if isinstance(dtnh, dict) and any(isinstance(v, dict) and v for v in dtnh.values()):
        out += ["| arch | DTNH over its base regulariser (step time) |", "|---|---|"]
        for arch, ratios in dtnh.items():
            if isinstance(ratios, dict):
                out.append(
                    f"| {arch} | "
                    + ", ".join(f"dtnh:{b} / {b} = {_num(v)}" for b, v in ratios.items())
                    + " |"
                )
        out.append("")
    if "trainer_over_bare_loop" in data:
        out.append(
            f"Trainer over a bare PyTorch loop (images per second): {_num(data['trainer_over_bare_loop'])}."
        )
    if "rss_import_mb" in data:
        out.append(
            "Peak RSS of a process that only imports torch and paramtransfer: "
            f"{_num(data['rss_import_mb'], '.0f')} MB."
        )
    out += _imagenet_speed(data.get("imagenet"))
    return "\n".join(out).rstrip()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _imagenet_speed(net: Any) -> list[str]:
    """The EfficientNet-Lite0 rows of ``bench speed`` (``data["imagenet"]``): every whole fit's time
    next to FT-0's with the blocks it cached, then the four ratios, then (where measured) every method's
    step next to fine-tuning's (:func:`_imagenet_steps`). Nothing for results without them
    (``--no-imagenet``, or measured before they existed); any key may be missing."""
    net = _dict(net)
    if not net:
        return []
    fit_s = _dict(net.get("fit_s"))
    ratios = _dict(net.get("fit_over_ft0"))
    cached = _dict(net.get("cached_prefix"))
    shape = net.get("input_shape")
    size = f" at {shape[-1]} px" if isinstance(shape, list) and shape else ""
    settings = _dict(net.get("fit_settings"))
    what = ", ".join(f"{k} {v}" for k, v in settings.items())
    if net.get("repeats") is not None:
        what += f"{', ' if what else ''}median of {net['repeats']} rounds"
    out = [
        "",
        f"{net.get('arch', 'efficientnet_lite0')}{size}: whole fits ({what or 'settings not recorded'})",
    ]
    specs = list(dict.fromkeys([*fit_s, *ratios, *cached]))
    if specs:
        out += ["", "| method | fit (s) | × FT-0 | cached prefix (blocks) |", "|---|---|---|---|"]
        for spec in specs:
            ratio = "1" if spec == "finetune" else _num(ratios.get(spec))
            prefix = cached.get(spec)
            prefix = str(prefix) if isinstance(prefix, int) and not isinstance(prefix, bool) else "—"
            out.append(f"| {spec} | {_num(fit_s.get(spec))} | {ratio} | {prefix} |")
    out += [
        "",
        f"FT-l sweep (every l, summed) over one FT-0: {_num(net.get('ftl_sweep_over_ft0'))}; "
        f"linear probe over FT-0: {_num(net.get('linear_probe_over_ft0'))}; "
        f"trainer over a bare loop converting alike (images per second): "
        f"{_num(net.get('trainer_over_bare_loop'))}; "
        f"streamed folder over in memory (training images per second): "
        f"{_num(net.get('streamed_over_memory'))}.",
    ]
    return out + _imagenet_steps(net)


def _imagenet_steps(net: dict[str, Any]) -> list[str]:
    """The per-step rows of the EfficientNet-Lite0 section (``train_step_ms``, ``eval_ms`` and their
    ratios to ``finetune``; ``dtnh_over_base``); nothing for results without them."""
    train_ms, eval_ms = _dict(net.get("train_step_ms")), _dict(net.get("eval_ms"))
    train_ratio, eval_ratio = _dict(net.get("train_step_ratio")), _dict(net.get("eval_ratio"))
    dtnh = _dict(net.get("dtnh_over_base"))
    specs = list(dict.fromkeys([*train_ms, *eval_ms, *train_ratio, *eval_ratio]))
    if not specs and not dtnh:
        return []
    settings = _dict(net.get("step_settings"))
    shape = settings.get("input_shape")
    size = f" at {shape[-1]} px" if isinstance(shape, list) and shape else ""
    what = []
    if settings.get("batch") is not None:
        what.append(f"batch {settings['batch']}")
    if settings.get("repeats") is not None:
        what.append(f"median of {settings['repeats']} interleaved rounds")
    if settings.get("warmup") is not None:
        what.append(f"after {settings['warmup']} warm-up steps")
    out = [
        "",
        f"{net.get('arch', 'efficientnet_lite0')}{size}: one training step and one evaluation pass next to "
        f"fine-tuning ({', '.join(what) or 'settings not recorded'})",
    ]
    if specs:
        out += ["", "| method | train step (ms) | × FT | eval (ms) | × FT |", "|---|---|---|---|---|"]
        for spec in specs:
            ft = spec == "finetune"
            step_x = "1" if ft else _num(train_ratio.get(spec))
            eval_x = "1" if ft else _num(eval_ratio.get(spec))
            out.append(
                f"| {spec} | {_num(train_ms.get(spec), '.1f')} | {step_x} | "
                f"{_num(eval_ms.get(spec), '.1f')} | {eval_x} |"
            )
    if dtnh:
        out += [
            "",
            "DTNH over its regulariser (training step): "
            + ", ".join(f"{base} {_num(v)}" for base, v in dtnh.items())
            + ".",
        ]
    return out
