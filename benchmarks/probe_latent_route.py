"""Where does a model's latent route break? Teacher-forced probes of SFT checkpoints (docs/demo.md).

For each ``--model CHECKPOINT:STAGE`` (the stage layout to run it in: 1, 2 or 3), on the first
``--n`` samples of ``--data``: the teacher-forced accuracy of the final ``\\boxed{}`` answer and of
the observation tokens (:func:`monet.eval.latent_route.teacher_forced_accuracy`), and for stages 1
and 2 how far the final hidden states move when the last helper image is replaced by noise
(:func:`monet.eval.latent_route.helper_sensitivity`, on ``--n-poison`` samples). Results go to
``--out`` as JSON and are printed as a table.

::

    python benchmarks/probe_latent_route.py --data runs/quickstart/data/val.json \\
        --image-root runs/quickstart/data --latent-size 4 \\
        --model runs/quickstart/stage1/latest:1 --model runs/quickstart/stage2/latest:2 --out route.json

Read it as: stage 1's answer accuracy is what the helper images make possible; stage 2's is what
survives when the text after a span may see its helper image only through the latents; a stage-2
``latents`` movement near 0 next to a large ``image_tokens`` one means the latent positions do not
read the image. Use the validation split, never the evaluation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def probe(model_dir: str, stage: int, samples: list, latent_size: int, n_poison: int) -> dict:
    import monet
    from monet.eval.latent_route import helper_sensitivity, teacher_forced_accuracy

    model, proc = monet.load_model(model_dir, dtype="float32", latent_size=latent_size)
    model.eval()
    row = {"model": model_dir, **teacher_forced_accuracy(model, proc, samples, stage, latent_size).as_dict()}
    if stage in (1, 2) and n_poison:
        row["sensitivity"] = helper_sensitivity(model, proc, samples[:n_poison], stage, latent_size).as_dict()
    return row


def _model_arg(text: str) -> tuple[str, int]:
    path, sep, stage = text.rpartition(":")
    if not sep or stage not in ("1", "2", "3"):
        raise argparse.ArgumentTypeError(f"--model must be CHECKPOINT:STAGE with STAGE 1, 2 or 3, got {text!r}")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"--model {text!r}: {path} is not a checkpoint folder")
    return path, int(stage)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="SFT JSON (the validation split)")
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--model", action="append", type=_model_arg, required=True, help="CHECKPOINT:STAGE, repeatable")
    ap.add_argument("--latent-size", type=int, required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--n-poison", type=int, default=16)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from monet.data import load_sft_dataset

    samples, _ = load_sft_dataset(a.data, a.image_root)
    samples = samples[: a.n]
    rows = [probe(path, stage, samples, a.latent_size, a.n_poison) for path, stage in a.model]
    print(f"{'model':<48} {'stage':>5} {'answer':>7} {'obs tok':>7} {'img':>7} {'latents':>8} {'after':>8}")
    for r in rows:
        s = r.get("sensitivity", {})
        obs = r["observation_token_accuracy"]
        print(f"{r['model'][-48:]:<48} {r['stage']:>5} {r['answer_accuracy']:>7.3f} "
              f"{'-' if obs is None else format(obs, '.3f'):>7} {s.get('image_tokens', float('nan')):>7.3f} "
              f"{s.get('latents', float('nan')):>8.4f} {s.get('text_after', float('nan')):>8.4f}")
    if a.out:
        a.out.write_text(json.dumps({"n": len(samples), "data": a.data, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
