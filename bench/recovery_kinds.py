"""Which weights recovery fits on a zoo model, and what recovery buys at one fixed sparsity.

For one model of ``bench/zoo_models.py``: the share of the prunable weights recovery calibrates
and fits (the rest it names, with why), then the model pruned at ``--sparsity`` (no search,
``target_sparsity``, tolerance wide open) with each ``--recover`` method, and the test-set
metric drop of each (the zoo's test split, seed 1). One model at a time: ::

    python bench/recovery_kinds.py --model g2p --sparsity 0.5 --recover none,auto

Run it against another checkout (``PYTHONPATH=/path/to/it``) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import BATCH, dataset, evalset, outputs, scores
from zoo_models import MODELS, model_path

import pruner
from pruner import PruneOptions, Recovery, Tolerance
from pruner._metrics import Metric
from pruner._recover import layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recover", default="none,auto")
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=400)
    args = parser.parse_args()
    key, spec = args.model, MODELS[args.model]
    original = model_path(key).read_bytes()
    model = onnx.load_from_string(original)
    inspection = pruner.inspect(model)
    found, skipped = layouts(model, list(inspection.layers))
    params = {la.name: la.params for la in inspection.layers}
    fitted = sum(params[n] for n in found)
    print(f"library: {Path(pruner.__file__).parent}  load: {os.getloadavg()[0]:.2f}")
    print(
        f"{key}: recovery fits {len(found)} of {len(params)} prunable weights, "
        f"{fitted / max(sum(params.values()), 1):.1%} of their params"
    )
    reasons = collections.Counter(skipped.values())
    for why, count in reasons.most_common():
        print(f"  not fitted: {count} x {why}")
    inputs, labels = dataset(key, args.n_eval, 0)
    test_inputs, test_labels = dataset(key, args.n_test, 1)
    reference = outputs(original, inputs, spec.output)
    test_reference = outputs(original, test_inputs, spec.output)
    data = evalset(key, inputs, labels, reference)
    metric = Metric(spec.metric)
    base = scores(key, original, test_inputs, test_labels, test_reference)
    print(f"  test metric unpruned: {base:.4f} ({metric.name}, n={args.n_test})")
    for method in args.recover.split(","):
        options = PruneOptions(
            metric=spec.metric,
            tolerance=Tolerance(1e9),
            target_sparsity=args.sparsity,
            recover=Recovery(method),
            batch_size=BATCH,
        )
        start = time.perf_counter()
        result = pruner.prune(original, data, options)
        wall = time.perf_counter() - start
        assert result.model_bytes is not None
        score = scores(key, result.model_bytes, test_inputs, test_labels, test_reference)
        summary = next((n for n in result.report.notes if n.startswith("recovery:")), "")
        print(
            f"  --recover {method:10s} sparsity {result.report.sparsity:.3f}  test {score:.4f}  "
            f"drop {metric.loss(base, score):+.4f}  wall {wall:.0f} s  {summary}"
        )


if __name__ == "__main__":
    main()
