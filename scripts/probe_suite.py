"""The copy, phone-book and composition probes (issue 14) on six families of about equal parameter count.

For every family in ``--families`` (configs/probes/<family>.py: a plain transformer, the recurrent-depth model,
TransformerFAM, Titans MAG, RMT, HRM; ~109k-119k parameters each) and every probe in ``--probes``
(looped_jax/data/probes.py: ``copy``, ``phonebook``; looped_jax/data/composition.py: ``multiplication``, ``dp``)
the script trains one model for ``--steps`` steps on the probe's train split (short problems) through
`looped_jax.train.trainer.Trainer`, then scores the trained parameters on every test split (longer strings,
bigger books, larger operands, longer lists):

* per-token accuracy: the share of answer tokens (weight > 0) predicted right (greedy argmax, teacher forced);
* exact match: the share of problems whose whole answer is right (`looped_jax.results.exact_match_counts`);
* for multiplication, Dziri et al.'s "seen subgraph" fraction of each test split (composition.seen_subgraph_report).

HRM is trained and scored in place ("fill-in"), its native task shape (like Sudoku: the grid with blanks in, the
whole grid out). Its blocks attend bidirectionally over a grid of exactly ``model.seq_len`` tokens (models/hrm.py,
mask_kind "bidirectional"), so on the causal next-token rows every position would see the token it must predict.
`fill_in_batch` rebuilds each row's problem instead: tokens t (t[0] = inputs[0], t[1:] = the targets of the real
positions) and answer mask a (a[0] = 0, a[1:] = weights > 0); HRM's row is inputs = t with every answer token
replaced by the blank PAD = 0 (reserved by every probe builder and never inside a problem; cells past the problem
are PAD too), targets = t, weights = a, padded to the grid. The grid is fixed-size, so ``model.seq_len`` is set
per probe to the longest TEST problem (`fill_in_len`; the config's value is a placeholder) and the (shorter)
training problems are padded up to it; training goes through the same Trainer, whose train iterator maps every
batch (`make_trainer`). HRM answers all answer positions at once after halt_max_steps ACT segments (no early
halting, as ``HRMModel.evaluate``), not token by token, so its cells are fill-in accuracy, not next-token
accuracy; the other families are scored teacher forced. Its parameter count does not depend on the grid (RoPE).
The blank is also what fills the grid past the problem, so HRM has to infer where the answer ends from the problem
(its length is fixed by it in every probe). Training is HRM's deep supervision: each optimizer step is one ACT
segment, and a row stays in the batch until it halts (up to halt_max_steps steps), so at equal steps HRM sees
fewer distinct problems than the other families.

Writes ``runs/<name>/results.md|json`` (one table: rows are probe x test split, a cell per family is
"token accuracy / exact match"; a second table lists the training runs) and ``runs/<name>/probes.png``
(accuracy against length / composition size per probe, one line per family), plus
``runs/<name>/seen_subgraph.png`` (multiplication exact match against the seen-subgraph fraction).

    python scripts/probe_suite.py --steps 300 --name probe_suite
    python scripts/probe_suite.py --quick --families transformer,rmt --probes copy   # a smoke run
    python scripts/probe_suite.py --steps 100 --config.train.global_batch_size=16   # overrides reach every run

Evaluation rows are padded at the end to a multiple of 32 tokens so few lengths compile; every family but HRM is
causal, so padding never changes the scored tokens (HRM's rows are padded to its grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("transformer", "recurrent_depth", "fam", "titans_mag", "rmt", "hrm")
PROBES = ("copy", "phonebook", "multiplication", "dp")
# Families trained and scored on in-place rows (`fill_in_batch`) instead of causal next-token rows.
FILL_IN = ("hrm",)
FILL_IN_NOTE = (
    "hrm: fill-in accuracy, not next-token: its bidirectional model sees the whole problem with every answer "
    "token blanked (PAD) on a fixed grid padded to the longest test problem of the probe (training problems "
    "padded up to it) and writes all answer tokens at once after its halt_max_steps ACT segments"
)
EVAL_PAD_MULTIPLE = 32

# Data of each probe: train on short problems, test to 4x (copy, dp) or 8x (phone book) and 5x5 digits.
PROBE_DATA = {
    "copy": {"data.copy_train_max_len": "16", "data.copy_test_lens": "(8,16,32,64)"},
    "phonebook": {"data.phonebook_train_entries": "4", "data.phonebook_test_entries": "(2,4,8,16,32)"},
    "multiplication": {"data.mult_train_max_digits": "3", "data.mult_test_max_digits": "5"},
    "dp": {"data.dp_train_max_len": "8", "data.dp_test_lens": "(4,8,12,16,24,32)"},
}
QUICK_DATA = {
    "copy": {"data.copy_train_max_len": "4", "data.copy_test_lens": "(4,8)"},
    "phonebook": {"data.phonebook_train_entries": "2", "data.phonebook_test_entries": "(2,4)"},
    "multiplication": {"data.mult_train_max_digits": "2", "data.mult_test_max_digits": "2"},
    "dp": {"data.dp_train_max_len": "4", "data.dp_test_lens": "(4,8)"},
}


# -- pure helpers ------------------------------------------------------------------------------------------


def parse_names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each in ``valid`` (order kept, duplicates dropped); otherwise a ValueError naming
    the bad entries and the valid ones."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(valid)}")
    return names


def train_row_len(data_cfg) -> int:
    """Input tokens of the longest training problem of a probe (the smallest data.seq_len that fits it)."""
    from looped_jax.data import composition, probes

    name = data_cfg.name
    if name == "copy":
        return probes.copy_input_len(data_cfg.copy_train_max_len)
    if name == "phonebook":
        return probes.phonebook_input_len(
            data_cfg.phonebook_train_entries, data_cfg.phonebook_name_len, data_cfg.phonebook_number_len
        )
    if name == "multiplication":
        d = data_cfg.mult_train_max_digits
        return composition.mult_input_len(d, d, data_cfg.mult_scratchpad)
    if name == "dp":
        return composition.dp_input_len(data_cfg.dp_train_max_len, data_cfg.dp_value_max, data_cfg.dp_answer)
    raise ValueError(f"no probe named {name!r}; choose from {', '.join(PROBES)}")


def split_size(data_cfg, split: str) -> tuple[str, float, bool]:
    """(label, number for a plot's x axis, inside the training range?) of a test split."""
    name = data_cfg.name
    if name == "multiplication":
        i, j = (int(x) for x in split.removeprefix("test_").split("x"))
        d = data_cfg.mult_train_max_digits
        return f"{i}x{j}", float(i * j), i <= d and j <= d
    if name == "phonebook":
        e = int(split.removeprefix("test_e"))
        return f"E={e}", float(e), e <= data_cfg.phonebook_train_entries
    n = int(split.removeprefix("test_len"))
    most = data_cfg.copy_train_max_len if name == "copy" else data_cfg.dp_train_max_len
    return f"n={n}", float(n), n <= most


def score_batch(pred_BT, targets_BT, weights_BT) -> dict[str, int]:
    """Counts of one batch: answer tokens right / scored, problems right / answered (padding rows neither)."""
    from looped_jax.results import exact_match_counts

    pred_BT, targets_BT = np.asarray(pred_BT), np.asarray(targets_BT)
    scored_BT = np.asarray(weights_BT) > 0
    exact, answered = exact_match_counts(pred_BT, targets_BT, weights_BT)
    return {
        "correct": int(((pred_BT == targets_BT) & scored_BT).sum()),
        "tokens": int(scored_BT.sum()),
        "exact": exact,
        "answered": answered,
    }


def add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    return {k: total.get(k, 0) + v for k, v in counts.items()}


def accuracies(counts: dict[str, int]) -> tuple[float, float]:
    """(per-token accuracy, exact match) of summed `score_batch` counts."""
    return counts["correct"] / max(counts["tokens"], 1), counts["exact"] / max(counts["answered"], 1)


def pad_batch(batch: dict, multiple: int = EVAL_PAD_MULTIPLE) -> dict:
    """Every [B, T] field zero-padded at the end to T rounded up to ``multiple`` (weights and segment ids 0
    there, so nothing padded is scored and causal models' outputs on the real tokens are unchanged)."""
    length = batch["inputs"].shape[1]
    pad = -length % multiple
    if not pad:
        return batch
    return {k: np.pad(np.asarray(v), ((0, 0), (0, pad))) for k, v in batch.items()}


BLANK = 0  # PAD of every probe vocabulary: HRM's blank answer cell (and the cells past a problem)


def fill_in_batch(batch: dict, grid_len: int) -> dict:
    """Causal next-token rows -> HRM's in-place rows of exactly ``grid_len`` cells.

    Per row, with L real positions (segment id > 0, a prefix of the row): tokens t [L + 1] (t[0] = inputs[0],
    t[1:] = targets[:L]) and answer mask a (a[0] = 0, a[1:] = weights[:L] > 0). Returns inputs = t with the
    answer cells set to BLANK, targets = t, weights = a (float32), segment_ids 1 and positions 0..L on the L + 1
    cells, zeros past them, and puzzle_ids 0 [B]. A padding row (L = 0) stays all zeros (weight 0). ValueError if
    a problem does not fit the grid, the real positions are not a prefix, or a problem holds BLANK itself.
    """
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    real = np.asarray(batch["segment_ids"]) > 0
    b, t = inputs.shape
    lengths = real.sum(1)
    if (real != (np.arange(t) < lengths[:, None])).any():
        raise ValueError("fill-in rows need unpacked rows: the real positions of a row must be a prefix")
    if (lengths + 1 > grid_len).any():
        raise ValueError(f"a problem of {int(lengths.max()) + 1} tokens does not fit HRM's grid of {grid_len}")
    tokens = np.zeros((b, t + 1), np.int32)
    tokens[:, 0] = np.where(lengths > 0, inputs[:, 0], BLANK)
    tokens[:, 1:] = np.where(real, targets, BLANK)
    answer = np.zeros((b, t + 1), bool)
    answer[:, 1:] = real & (np.asarray(batch["weights"]) > 0)
    cells = np.arange(t + 1) < np.where(lengths > 0, lengths + 1, 0)[:, None]
    if (tokens[cells] == BLANK).any():
        raise ValueError(f"a problem holds the blank token {BLANK}: its answer cells would be ambiguous")

    def grid(x):  # cells past every problem are zero, so cutting at grid_len drops nothing
        return np.pad(x, ((0, 0), (0, max(0, grid_len - (t + 1)))))[:, :grid_len]

    return {
        "inputs": grid(np.where(answer, BLANK, tokens)),
        "targets": grid(tokens),
        "weights": grid(answer.astype(np.float32)),
        "segment_ids": grid(cells.astype(np.int32)),
        "positions": grid(np.arange(t + 1, dtype=np.int32) * cells),
        "puzzle_ids": np.zeros(b, np.int32),
    }


def fill_in_len(data_cfg) -> int:
    """HRM's grid for a probe: tokens of its longest problem over the train and every test split (inputs + 1)."""
    from looped_jax.data import composition, probes, split_names

    row_len = {
        "copy": probes.copy_row_len,
        "phonebook": probes.phonebook_row_len,
        "multiplication": composition.mult_row_len,
        "dp": composition.dp_row_len,
    }[data_cfg.name]
    return 1 + max(row_len(data_cfg, s) for s in split_names(data_cfg))


class FillInIterator:
    """A train iterator whose batches go through `fill_in_batch`; its state is the wrapped iterator's."""

    def __init__(self, iterator, grid_len: int):
        self.iterator, self.grid_len = iterator, grid_len

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return fill_in_batch(next(self.iterator), self.grid_len)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def make_trainer(cfg, fill_in: bool):
    """`Trainer` for ``cfg``; with ``fill_in`` one whose train (and ``evaluate``) batches are HRM's in-place rows
    on a grid of ``cfg.model.seq_len`` cells."""
    from looped_jax.train.trainer import Trainer

    if not fill_in:
        return Trainer(cfg)

    class FillInTrainer(Trainer):
        def make_train_iterator(self):
            return FillInIterator(super().make_train_iterator(), self.cfg.model.seq_len)

        def evaluate(self, params, split: str, *, num_batches=None, num_loops=None, batch_size=None) -> dict:
            import jax
            import jax.numpy as jnp

            from looped_jax.data import make_eval_batches
            from looped_jax.train.trainer import model_params, summarize_eval

            batches = make_eval_batches(
                self.cfg.data, split, batch_size or self.cfg.train.global_batch_size, max_batches=num_batches
            )
            loops = None if num_loops is None else jnp.int32(num_loops)
            totals: dict[str, float] = {}
            with jax.set_mesh(self.mesh):
                for b in batches:
                    batch = self.global_batch(fill_in_batch(b, self.cfg.model.seq_len))
                    out = jax.device_get(self.eval_step(model_params(params), batch, loops))
                    totals = {k: totals.get(k, 0.0) + float(v) for k, v in out.items()}
            return summarize_eval(totals)

    return FillInTrainer(cfg)


def param_deviation(counts: dict[str, int], reference: str = "transformer") -> dict[str, float]:
    """Relative parameter difference of every family from ``reference`` ((n - n_ref) / n_ref)."""
    if reference not in counts:
        raise ValueError(f"reference family {reference!r} not among {sorted(counts)}")
    ref = counts[reference]
    return {name: (n - ref) / ref for name, n in counts.items()}


# -- runs --------------------------------------------------------------------------------------------------


def family_config(family: str, overrides: dict[str, str]):
    """configs/probes/<family>.py with ``overrides``; model.vocab_size raised to the data's when smaller,
    data.seq_len set to the longest training problem unless given, and a fill-in family's model.seq_len (its grid)
    to the longest problem of the probe (`fill_in_len`) unless given."""
    from looped_jax.config import load_config
    from looped_jax.data import vocab_size

    path = ROOT / "configs" / "probes" / f"{family}.py"
    probe_cfg = load_config(path, {**overrides, "data.seq_len": overrides.get("data.seq_len", "4096")})
    extra = {}
    if "data.seq_len" not in overrides:
        extra["data.seq_len"] = str(train_row_len(probe_cfg.data))
    if "model.vocab_size" not in overrides and probe_cfg.model.vocab_size < vocab_size(probe_cfg.data):
        extra["model.vocab_size"] = str(vocab_size(probe_cfg.data))
    cfg = load_config(path, {**overrides, **extra})
    if family in FILL_IN and "model.seq_len" not in overrides:  # HRM's grid: the longest problem of the probe
        cfg = load_config(path, {**overrides, **extra, "model.seq_len": str(fill_in_len(cfg.data))})
    return cfg


def num_params(model_cfg) -> int:
    from flax import nnx

    from looped_jax.models import build_model, count_params

    return int(count_params(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))))


def evaluate(trainer, params, data_cfg, split: str, batch_size: int, forward, grid_len: int = 0) -> dict[str, int]:
    """Summed `score_batch` counts of the trained model over one test split (with ``grid_len``: on in-place rows
    of that many cells, `fill_in_batch`)."""
    import jax

    from looped_jax.data import make_eval_batches

    counts: dict[str, int] = {}
    with jax.set_mesh(trainer.mesh):
        for b in make_eval_batches(data_cfg, split, batch_size):
            b = fill_in_batch(b, grid_len) if grid_len else pad_batch(b)
            pred = np.asarray(forward(params, b["inputs"], b["positions"], b["segment_ids"]))
            counts = add_counts(counts, score_batch(pred, b["targets"], b["weights"]))
    return counts


def train_and_score(cfg, splits: list[str], eval_batch: int, label: str, fill_in: bool = False) -> dict:
    """Trains ``cfg`` once and scores the trained parameters on every split (``fill_in``: on in-place rows of
    ``cfg.model.seq_len`` cells, `fill_in_batch`, for training and scoring)."""
    import jax
    from flax import nnx

    t0 = time.perf_counter()
    trainer = make_trainer(cfg, fill_in)
    state, history = trainer.fit()
    params = state.eval_params
    train_s = time.perf_counter() - t0
    loss = (history.get("train") or {}).get("loss", float("nan"))
    print(f"  {label}: {history['steps']} steps in {train_s:.1f} s (final train loss {loss:.4f})", flush=True)
    graphdef = trainer.graphdef
    forward = jax.jit(lambda p, x, pos, seg: nnx.merge(graphdef, p)(x, positions_BT=pos, segment_ids_BT=seg).argmax(-1))
    scores = {}
    t1 = time.perf_counter()
    for split in splits:
        grid_len = cfg.model.seq_len if fill_in else 0
        counts = evaluate(trainer, params, cfg.data, split, eval_batch, forward, grid_len)
        tok, exact = accuracies(counts)
        scores[split] = {**counts, "token_accuracy": tok, "exact_match": exact}
        print(f"    {split}: token {tok:.3f}  exact {exact:.3f}  ({counts['answered']} problems)", flush=True)
    return {
        "steps": history["steps"],
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
        "final_train_loss": loss,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "scores": scores,
    }


# -- output ------------------------------------------------------------------------------------------------


def build_tables(results: dict):
    """The accuracy table (probe x test split rows, a "token / exact" cell per family) and the runs table."""
    from looped_jax.results import Table

    families, runs = results["families"], results["runs"]
    header = ["probe", "test split", "size", "train range", "seen subgraphs"]
    header += [f"{f} ({_params_label(results['params'][f])})" for f in families]
    rows = []
    for probe in results["probes"]:
        info = results["splits"][probe]
        seen = results["seen_subgraph"].get(probe, {})
        for split in info:
            label, _, inside = info[split]
            row = [probe, split, label, "in" if inside else "beyond", f"{seen[split]:.3f}" if split in seen else "—"]
            for f in families:
                run = runs.get(f, {}).get(probe)
                if run is None:
                    row.append("n/a")
                else:
                    s = run["scores"][split]
                    row.append(f"{s['token_accuracy']:.3f} / {s['exact_match']:.3f}")
            rows.append(row)
    caption = (
        f"Each cell: per-token accuracy / exact match (whole answer right) on {results['num_test']} test problems "
        f"per split, greedy and teacher forced; one model per family and probe, trained {results['steps']} steps "
        f"on the train split (batch {results['batch']}, rows of at most the 'in' sizes). 'beyond' marks sizes "
        "longer or larger than any training problem. 'seen subgraphs': Dziri et al.'s mean fraction of a test "
        "problem's computation-graph nodes whose full sub-computation occurs in the training problems "
        "(multiplication only). Column headers give parameter counts."
        + (f" {FILL_IN_NOTE}." if any(f in FILL_IN for f in families) else "")
    )
    acc = Table(header, rows, title="Probe accuracy (token / exact) by test split and family", caption=caption)
    run_rows = [
        [f, p, r["params"], r["steps"], r["row_tokens"], f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}",
         f"{r['final_train_loss']:.4f}"]
        for f in families for p, r in runs.get(f, {}).items()
    ]  # fmt: skip
    runs_table = Table(
        ["family", "probe", "params", "steps", "train row tokens", "train s", "eval s", "final train loss"],
        run_rows or [["—"] * 8],
        title="Training runs",
        caption="Wall seconds on this machine (train includes compilation). Train row tokens: the training row "
        "length (causal families: the longest training problem; hrm: its grid, the longest test problem); hrm's "
        "final train loss is its ACT loss (token loss on the segment's rows + halting losses).",
    )
    return [acc, runs_table]


def _params_label(counts: set | list) -> str:
    counts = sorted(set(counts))
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes, families, runs = results["probes"], results["families"], results["runs"]
    fig, axes = plt.subplots(2, len(probes), figsize=(4.2 * len(probes), 7), squeeze=False)
    for col, probe in enumerate(probes):
        info = results["splits"][probe]
        order = sorted(info, key=lambda s: (not info[s][2], info[s][1], s))  # training range first, then size
        xs = range(len(order))
        for row, (key, name) in enumerate((("token_accuracy", "token accuracy"), ("exact_match", "exact match"))):
            ax = axes[row][col]
            for f in families:
                run = runs.get(f, {}).get(probe)
                if run is not None:
                    ax.plot(xs, [run["scores"][s][key] for s in order], marker="o", label=f)
            inside = [i for i, s in enumerate(order) if info[s][2]]
            if inside and len(inside) < len(order):
                ax.axvline(max(inside) + 0.5, color="grey", ls="--", lw=0.8)
            ax.set_xticks(list(xs), [info[s][0] for s in order], rotation=60 if len(order) > 8 else 0, fontsize=7)
            ax.set(ylim=(-0.03, 1.03), ylabel=name, title=f"{probe}: {name}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['steps']} training steps; dashed line: end of the training range")
    fig.tight_layout()
    paths = [out / "probes.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    seen = results["seen_subgraph"].get("multiplication")
    if seen:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for f in families:
            run = runs.get(f, {}).get("multiplication")
            if run is not None:
                ax.scatter([seen[s] for s in seen], [run["scores"][s]["exact_match"] for s in seen], label=f, s=14)
        ax.set(xlabel="seen-subgraph fraction (Dziri et al.)", ylabel="exact match", title="multiplication")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "seen_subgraph.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    from looped_jax.config import apply_overrides, parse_overrides

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list from {', '.join(FAMILIES)}")
    ap.add_argument("--probes", default=",".join(PROBES), help=f"comma list from {', '.join(PROBES)}")
    ap.add_argument("--steps", type=int, default=0, help="train.num_steps of every run (0: the config's)")
    ap.add_argument("--eval_batch", type=int, default=50, help="rows per evaluation batch")
    ap.add_argument("--name", default="probe_suite", help="results go to <root>/<name>/")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 8 problems per split, short problems")
    args, rest = ap.parse_known_args(argv)
    try:
        families = parse_names(args.families, FAMILIES, "family")
        probes = parse_names(args.probes, PROBES, "probe")
        user = parse_overrides(rest)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 0 or args.eval_batch < 1:
        ap.error(f"--steps must be >= 0 and --eval_batch >= 1, got {args.steps}, {args.eval_batch}")

    from looped_jax.data import prepare, split_names
    from looped_jax.data.composition import seen_subgraph_report
    from looped_jax.results import write_results

    base = {"data.num_train": "256", "data.num_test": "8", "train.num_steps": "3"} if args.quick else {}
    if args.steps:
        base["train.num_steps"] = str(args.steps)
    results: dict = {"families": families, "probes": probes, "params": {f: [] for f in families}, "runs": {},
                     "splits": {}, "seen_subgraph": {}, "quick": args.quick}  # fmt: skip
    out_dir = Path(args.root) / args.name
    t_start = time.perf_counter()
    total = len(probes) * len(families)
    done = 0
    for probe in probes:
        data = {"data.name": probe, **(QUICK_DATA if args.quick else PROBE_DATA)[probe]}
        configs = {}
        for family in families:
            run_dir = {"train.output_dir": str(out_dir / "train" / f"{family}_{probe}")}
            cfg = family_config(family, {**base, **data, **run_dir, **user})
            if "train.log_every" not in user:
                cfg = apply_overrides(cfg, {"train.log_every": max(1, cfg.train.num_steps // 5)})
            configs[family] = cfg
            results["params"][family].append(num_params(cfg.model))
        data_cfg = next(iter(configs.values())).data
        prepare(data_cfg)
        splits = [s for s in split_names(data_cfg) if s != "train"]
        results["splits"][probe] = {s: split_size(data_cfg, s) for s in splits}
        if probe == "multiplication":
            t0 = time.perf_counter()
            results["seen_subgraph"][probe] = seen_subgraph_report(data_cfg)
            print(f"seen-subgraph statistic of {len(splits)} splits in {time.perf_counter() - t0:.1f} s", flush=True)
        for family, cfg in configs.items():
            done += 1
            fill_in = family in FILL_IN
            rows = f"in-place grids of {cfg.model.seq_len}" if fill_in else f"rows of {cfg.data.seq_len}"
            print(f"== [{done}/{total}] {family} on {probe}: {cfg.train.num_steps} steps, batch "
                  f"{cfg.train.global_batch_size}, {rows} tokens, "
                  f"{time.perf_counter() - t_start:.0f} s elapsed", flush=True)  # fmt: skip
            run = train_and_score(cfg, splits, args.eval_batch, f"{family} on {probe}", fill_in)
            run["row_tokens"] = cfg.model.seq_len if fill_in else cfg.data.seq_len
            results["runs"].setdefault(family, {})[probe] = run
        results["steps"] = next(iter(configs.values())).train.num_steps
        results["batch"] = next(iter(configs.values())).train.global_batch_size
        results["num_test"] = data_cfg.num_test
    counts = {f: max(results["params"][f]) for f in families}
    if "transformer" in counts:
        results["param_deviation"] = param_deviation(counts)
        print("parameters vs transformer: " + ", ".join(f"{f} {d:+.1%}" for f, d in results["param_deviation"].items()))
    results["wall_seconds"] = time.perf_counter() - t_start
    tables = build_tables(results)
    out = write_results(args.name, tables, results, root=args.root)
    pngs = plot(results, out)
    print("\n" + "\n\n".join(t.markdown() for t in tables), flush=True)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {', '.join(str(p) for p in pngs)} "
          f"in {results['wall_seconds']:.0f} s")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
