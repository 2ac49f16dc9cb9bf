"""PELA's weight-perturbation regularizer in its two forms, side by side on the digits Transformer.

`recipes/pela.yaml` (rho 2, gamma 1, eps 1e-3, 10 epochs) with `wp_form: squared` (docs/methods.md's
(||B A - W||_max - eps)^2) and `wp_form: hinge` (max(0, ...)^2), same model, data and seeds:
test accuracy of each student and the final L_wp term.

    python benchmarks/pela_wp.py [--seeds 2] [--out benchmarks/results/pela_wp.json]
"""
from __future__ import annotations

from common import arguments, load_recipe_dict, run_recipe, scratch, write_results

from compress.examples.training import train_digits_transformer


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    work = scratch()
    model = work / "dt.pt"
    summary = train_digits_transformer(model, progress=False)
    results = {"original_accuracy": summary["test_accuracy"], "runs": []}
    for seed in range(args.seeds):
        for form in ("squared", "hinge"):
            document = load_recipe_dict("pela.yaml")
            document["seed"] = seed
            document["gates"] = {}
            document["bench"] = {"batch_sizes": [1], "warmup": 1, "runs": 5, "baselines": []}
            document["stages"][0]["wp_form"] = form
            report = run_recipe(document, model, work, f"pela-{form}-{seed}")
            row = {"seed": seed, "wp_form": form, "accuracy": report["compressed"]["metric"]["value"],
                   "final_wp_term": report["finetune"]["loss_terms"].get("pela.weight")}
            results["runs"].append(row)
            print(row, flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
