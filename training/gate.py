"""The gate: approve or reject a model from its evaluation, before it is registered or shipped.

    python -m training.gate --metrics models/efficientnet_lite0_cars/metrics.json
    python -m training.gate --metrics runs/x/eval_test.json --min_top1 0.80 --min_class_recall 0.3 \\
        --baseline models:/efficientnet_lite0_cars@production --max_regression 0.01

Rules (defaults in `GateRules`, each overridable on the command line):
* top-1 on the held-out split at least `min_top1` (the original plan's example was 65 %);
* optionally, every class's recall at least `min_class_recall` (off by default: our test split has
  5-6 photos per class, so one photo moves a class by 17-20 points);
* optionally, top-1 on the same held-out cars' uncropped photos at least `min_top1_photos`
  (training.evaluate's photos view);
* no more than `max_regression` top-1 below the baseline: the registered production version
  (`models:/NAME@ALIAS`, its `top1` tag from training.tracking) or another metrics.json. A
  registry without that alias yet (the first model) passes this rule and says so.

Prints one line, `APPROVED: ...` or `REJECTED: ...`; exit code 0 approved, 1 rejected,
2 when the gate cannot decide (missing or unreadable metrics, no whole-photo figures for a whole-photo
floor, unknown baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from training import registry

APPROVED, REJECTED, CANNOT_DECIDE = 0, 1, 2


class GateError(RuntimeError):
    pass


@dataclass(frozen=True)
class GateRules:
    min_top1: float = 0.65
    min_class_recall: float | None = None
    max_regression: float = 0.01  # top-1, absolute: one point
    min_top1_photos: float | None = None  # top-1 on the held-out cars' uncropped photos (evaluate's photos view)


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reason: str

    @property
    def line(self) -> str:
        return f"{'APPROVED' if self.approved else 'REJECTED'}: {self.reason}"


def read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise GateError(f"no metrics at {path}: run python -m training.evaluate first") from err
    except (OSError, json.JSONDecodeError) as err:
        raise GateError(f"cannot read metrics {path}: {err}") from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get("top1"), (int, float)):
        raise GateError(f"{path} has no top1: not an evaluation's metrics (training.evaluate writes them)")
    return metrics


def baseline_top1(reference: str | None) -> tuple[float | None, str]:
    """(top-1, description) of what the candidate must not fall behind; (None, why) when there is nothing yet."""
    if not reference:
        return None, "no baseline given"
    if reference.startswith("models:/"):
        version = registry.model_version(reference)
        if version is None:
            return None, f"no {reference} yet"
        if "top1" not in version.tags:
            raise GateError(f"{reference} (version {version.version}) has no top1 tag to compare with")
        return float(version.tags["top1"]), f"{reference} (version {version.version})"
    return float(read_metrics(Path(reference))["top1"]), reference


def decide(
    metrics: dict, rules: GateRules, baseline: tuple[float | None, str] = (None, "no baseline given")
) -> Verdict:
    top1 = float(metrics["top1"])
    split = f"{metrics.get('split', 'held-out')} ({metrics.get('num_images', '?')} images)"
    if top1 < rules.min_top1:
        return Verdict(False, f"top-1 {top1:.2%} on {split} is below the minimum {rules.min_top1:.2%}")
    checks = [f"top-1 {top1:.2%} on {split} >= {rules.min_top1:.2%}"]
    if rules.min_class_recall is not None:
        recalls = {name: row["recall"] for name, row in metrics.get("per_class", {}).items()}
        if not recalls:
            raise GateError("a per-class floor needs per_class recalls in the metrics (training.evaluate writes them)")
        low = sorted((r, name) for name, r in recalls.items() if r < rules.min_class_recall)
        if low:
            worst = ", ".join(f"{name} {r:.0%}" for r, name in low[:3])
            return Verdict(False, f"{len(low)} class(es) below recall {rules.min_class_recall:.0%}: {worst}")
        checks.append(f"every class >= {rules.min_class_recall:.0%} recall")
    if rules.min_top1_photos is not None:
        photos = metrics.get("views", {}).get("photos")
        if not photos:
            raise GateError("--min_top1_photos needs whole-photo figures: training.evaluate's photos view")
        if photos["top1"] < rules.min_top1_photos:
            return Verdict(
                False,
                f"whole-photo top-1 {photos['top1']:.2%} on {photos['num_images']} photos is below the minimum "
                f"{rules.min_top1_photos:.2%}",
            )
        checks.append(f"whole photos {photos['top1']:.2%} >= {rules.min_top1_photos:.2%}")
    reference_top1, reference = baseline
    if reference_top1 is None:
        checks.append(f"{reference}: nothing to regress against")
    elif top1 < reference_top1 - rules.max_regression:
        return Verdict(
            False,
            f"top-1 {top1:.2%} is {reference_top1 - top1:.2%} below {reference} ({reference_top1:.2%}); "
            f"allowed {rules.max_regression:.2%}",
        )
    else:
        checks.append(f"{top1 - reference_top1:+.2%} vs {reference} ({reference_top1:.2%})")
    return Verdict(True, "; ".join(checks))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, type=Path, help="an evaluation's metrics.json / eval_test.json")
    for rule in fields(GateRules):
        parser.add_argument(f"--{rule.name}", type=float, default=rule.default, help=f"default {rule.default}")
    parser.add_argument("--baseline", help="models:/NAME@ALIAS (the registry) or a metrics.json to compare with")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rules = GateRules(**{rule.name: getattr(args, rule.name) for rule in fields(GateRules)})
    try:
        verdict = decide(read_metrics(args.metrics), rules, baseline_top1(args.baseline))
    except (GateError, registry.RegistryError) as err:
        print(f"ERROR: {err}")
        return CANNOT_DECIDE
    print(verdict.line)
    return APPROVED if verdict.approved else REJECTED


if __name__ == "__main__":
    sys.exit(main())
