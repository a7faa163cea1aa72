"""Data-free synthesis throughput: images/s of each generator at the synthesize command's defaults.

    python -m benchmarks.bench_synthesis [--quick] [--generators vqgan fourier pixel] [--steps-timed K]
                                         [--batch B] [--cutouts N] [--teacher NAME] [--repeats R]

One timed repeat is :meth:`ImageGenerator.generate` on one batch for ``--steps-timed`` Adam
steps (cutouts, the teacher's forward and backward, the generator's render and its backward);
the per-image rate at the command's default number of steps (``--steps``, 100) is
``batch / (median_s * steps / steps_timed)`` (a step costs the same at every step; the one
initialization and the final scoring are counted ``steps / steps_timed`` times, so the rate
errs low). Defaults (a GPU): ``clipdistill synthesize``'s own: teacher ViT-B-32 (random init,
as open_clip builds it; bf16 on a GPU as the engine loads teachers), its input side (224), batch
8, 16 cutouts with VQGAN-CLIP's augmentations, and for ``vqgan`` a random-init diffusers VQModel
of the size of taming-transformers' ``vqgan_imagenet_f16_1024`` (f16, 1024 codes of 256
channels, 128-128-256-256-512 channels, two resnets per level, attention at 16x16: 14x14
latents at 224 px). ``--quick`` (the default without a GPU): the tiny teacher, 32 px, batch 2,
2 cutouts, 2 steps, the tiny VQModel. Rows: one per generator, ``images_per_s`` the rate above,
``step_ms`` the median per step.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from benchmarks.harness import measure, print_table, record, summary_line
from clipdistill.engine.datafree.generators import (DEFAULT_AUGMENT, GENERATORS, build_generator, diffusers_available,
                                                    random_vqgan, teacher_image_features, teacher_input_spec)
from clipdistill.engine.datafree.synthesize import SynthesisPlan, load_teacher

BENCHMARK = "bench_synthesis"

# taming-transformers' vqgan_imagenet_f16_1024 (ch 128, ch_mult 1,1,2,2,4, 2 resnets, attention at
# resolution 16, z 256, 1024 codes of 256) as diffusers VQModel arguments.
VQGAN_F16_1024_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=256,
    num_vq_embeddings=1024, vq_embed_dim=256, norm_num_groups=32, sample_size=256,
)


def make_case(name: str, args: argparse.Namespace, teacher) -> Callable[[], object]:
    """A zero-argument call that runs ``generate`` for one batch at ``args``' settings."""
    side, _, _ = teacher_input_spec(teacher)
    device = teacher.model.logit_scale.device
    image_size = args.image_size or side
    # Random weights: vqgan_imagenet_f16_1024's are not needed to time it.
    vqgan = ("tiny" if args.quick else random_vqgan(VQGAN_F16_1024_CONFIG)) if name == "vqgan" else None
    generator = build_generator(name, image_size, vqgan=vqgan, device=device)
    with torch.no_grad():
        dim = teacher_image_features(teacher, torch.zeros(1, 3, side, side, device=device)).shape[-1]
    targets = torch.nn.functional.normalize(torch.randn(args.batch, dim, generator=torch.Generator().manual_seed(0)),
                                            dim=-1).to(device)
    seeds = list(range(args.batch))

    def run():
        return generator.generate(teacher, targets, seeds, steps=args.steps_timed, n_cutouts=args.cutouts,
                                  augment=args.augment)

    return run


def _parser() -> argparse.ArgumentParser:
    plan = SynthesisPlan(teacher="", teacher_weights=None, class_names=())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (the default without a GPU)")
    parser.add_argument("--generators", nargs="+", choices=GENERATORS, default=list(GENERATORS))
    parser.add_argument("--teacher", default=None, help="default: ViT-B-32 (the command's); quick: the tiny one")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: the command's, 8)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the teacher's input side")
    parser.add_argument("--cutouts", type=int, default=None, help=f"default: the command's, {plan.n_cutouts}")
    parser.add_argument("--augment", default=DEFAULT_AUGMENT)
    parser.add_argument("--steps", type=int, default=plan.steps, help="steps per image the rate is given for")
    parser.add_argument("--steps-timed", type=int, default=None, help="steps per timed repeat (default 10; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 2)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.quick = quick = args.quick or not torch.cuda.is_available()
    args.teacher = args.teacher or ("clipdistill-tiny-teacher" if quick else "ViT-B-32")
    args.batch = args.batch or (2 if quick else 8)
    args.cutouts = args.cutouts or (2 if quick else SynthesisPlan.n_cutouts)
    args.image_size = args.image_size or (32 if quick else None)
    args.steps_timed = args.steps_timed or (2 if quick else 10)
    args.repeats = args.repeats or (2 if quick else 5)
    return args


def _teacher(args: argparse.Namespace):
    return load_teacher(args.teacher, None, "cuda" if torch.cuda.is_available() and not args.quick else "cpu")


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """One quick generate per generator (the teacher and generators are built on the first call)."""
    state: dict = {}
    names = [n for n in GENERATORS if n != "vqgan" or diffusers_available()]

    def case(name: str):
        def run():
            if not state:
                args = _parse(["--quick", "--steps-timed", "1"])
                teacher = _teacher(args)
                state.update({n: make_case(n, args, teacher) for n in names})
            return state[name]()

        return run

    return [(f"{name}-tiny", case(name)) for name in names]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    teacher = _teacher(args)
    device = teacher.model.logit_scale.device
    side, _, _ = teacher_input_spec(teacher)
    rows, skipped = [], {}
    for name in args.generators:
        if name == "vqgan" and not diffusers_available():
            skipped[name] = "diffusers is not installed"
            continue
        fn = make_case(name, args, teacher)
        stats = measure(fn, device=device, warmup=1, repeats=args.repeats)
        batch_seconds = stats["median"] / 1e3 * args.steps / args.steps_timed  # one batch at --steps steps
        rows.append({
            "provider": name,
            "shape": f"{args.teacher},B={args.batch},S={args.image_size or side},cutouts={args.cutouts},"
                     f"augment={args.augment},steps={args.steps}",
            "dtype": str(teacher.input_dtype).replace("torch.", ""), "metric": "generate_ms", **stats,
            "steps_timed": args.steps_timed, "step_ms": stats["median"] / args.steps_timed,
            "images_per_s": args.batch / batch_seconds,
            "vqgan": ("tiny" if args.quick else "random f16-1024 (taming size)") if name == "vqgan" else None,
        })
    written = record(BENCHMARK, rows, device=device, quick=args.quick)
    print_table(written, ["provider", "shape", "dtype", "step_ms", "images_per_s", "repeats", "peak_mem_bytes"])
    summary_line(BENCHMARK, written, images_per_s={r["provider"]: round(r["images_per_s"], 4) for r in written},
                 steps=args.steps, skipped=skipped or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
