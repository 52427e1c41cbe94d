"""How close each stage comes to the least work it can do. Prints a table and writes JSON.

    python benchmarks/bench.py                      # CPU (CUDA when present), one thread, about 5 minutes
    python benchmarks/bench.py --threads 2 --out output/benchmark_2_threads.json

Every figure is a ratio of two timings taken in the same process, or a count. Each ratio is
measured --repeats times (the two timings interleaved within each repeat, so that a change in the
machine's speed hits both) and given as the median with the min-max range over the repeats; on a
busy machine the range shows how far one measurement can swing. --threads sets torch's CPU threads.
1. MIMIC step: one full distillation step / (student NT-Xent step on two views + one no-grad
   teacher forward of one view), same batch. Target <= 1.1.
2. MI estimation: encoder forward passes per clean image (target exactly 1), the statistics-network
   training time, and the extrapolated time of the paper's setting (2,000 images, 200 epochs,
   4 blocks of a width-64 ResNet-18).
3. Downstream classifier: epochs at batch 64 on 10,000 x 512 features, 10 classes, with the
   per-epoch evaluation, scaled to 1,000 epochs (every epoch is the same work); and that time /
   the model compute it cannot avoid: the same training batches (gathered beforehand, untimed)
   plus the evaluation's two forward passes over the clean and triggered test features. Target
   <= 1.3. Also that time / the training batches alone (the evaluation counted as overhead).
4. Stage 0 input pipeline: images/s of the real SimCLR loop (index + augment + step) / images/s of
   the same steps on pre-augmented tensors. Target >= 0.85.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import MIMIC  # noqa: E402
import training_downstream_classifier as downstream  # noqa: E402
from datasets.loader import ViewLoader, index_batches  # noqa: E402
from models import DownstreamClassifier, SimCLR, nt_xent  # noqa: E402
from models.distill import distill_step  # noqa: E402
from models.metrics import backdoor_metrics  # noqa: E402
from models.mine import StatisticsNetwork, dv_bound, evaluate_bound  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def timed(fn, repeats, warmup=1, device=None):
    """Median seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def spread(ratios):
    """Median and min-max of repeated measurements, with the values."""
    return {"median": float(np.median(ratios)), "min": float(min(ratios)), "max": float(max(ratios)),
            "values": [float(r) for r in ratios]}


def show(figure):
    return f"{figure['median']:.3f} ({figure['min']:.3f}-{figure['max']:.3f})"


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def simclr_step(model, optimizer, v1, v2):
    """One NT-Xent step on two views: the least work of a stage 0 or stage 2 step."""
    _, z1 = model(v1)
    _, z2 = model(v2)
    loss = nt_xent(z1, z2, 0.5)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_mimic_step(device, width, batch, repeats, steps=3):
    torch.manual_seed(0)
    student, teacher = SimCLR(width=width).to(device), SimCLR(width=width).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    v1, v2 = torch.randn(batch, 3, 32, 32, device=device), torch.randn(batch, 3, 32, 32, device=device)
    weights = [3500.0] * 4

    def full():
        distill_step(student, teacher, v1, v2, optimizer, weights, 1.0, 0.5)

    def minimum():
        simclr_step(student, optimizer, v1, v2)
        with torch.no_grad():
            teacher.f(v1)

    full(), minimum()                       # warm-up
    # Per repeat: the median of `steps` interleaved pairs, so drifts in machine speed hit both alike.
    t_full, t_min, ratios = [], [], []
    for _ in range(repeats):
        pairs = [(timed(full, 1, warmup=0, device=device), timed(minimum, 1, warmup=0, device=device))
                 for _ in range(steps)]
        t_full.append(float(np.median([f for f, _ in pairs])))
        t_min.append(float(np.median([m for _, m in pairs])))
        ratios.append(t_full[-1] / t_min[-1])
    return {"width": width, "batch": batch, "steps_per_repeat": steps, "full_step_s": float(np.median(t_full)),
            "minimum_s": float(np.median(t_min)), "ratio": spread(ratios)}


def bench_mi(device, width, n, mi_epochs):
    torch.manual_seed(0)
    teacher = SimCLR(width=width).to(device).eval()
    seen = {"images": 0}
    hook = teacher.register_forward_pre_hook(lambda m, inp: seen.__setitem__("images", seen["images"] + len(inp[0])))
    t0 = time.perf_counter()
    MIMIC.locate_knowledge(teacher, images(n), MEAN, STD, device, 128, MIMIC.MISettings(epochs=mi_epochs, seed=0))
    total = time.perf_counter() - t0
    hook.remove()

    # Extrapolate the paper's setting from the cost of one estimator step and one evaluation at
    # the paper's block sizes (width-64 ResNet-18 on 32x32: 64x32x32, 128x16x16, 256x8x8, 512x4x4).
    paper_n, paper_batch, paper_epochs = 2000, 128, 200
    steps = paper_n // paper_batch
    paper = 0.0
    for dim in (64 * 32 * 32, 128 * 16 * 16, 256 * 8 * 8, 512 * 4 * 4):
        net = StatisticsNetwork(dim, 512).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        a, z = torch.randn(paper_batch, dim, device=device), torch.randn(paper_batch, 512, device=device)
        perm = torch.randperm(paper_batch, device=device)

        def step():
            loss = -dv_bound(*net(a, z, perm))
            opt.zero_grad()
            loss.backward()
            opt.step()
        t_step = timed(step, 3, device=device)
        a_all, z_all = torch.randn(paper_n, dim, device=device), torch.randn(paper_n, 512, device=device)
        t_eval = timed(lambda: evaluate_bound(net, a_all, z_all, [torch.randperm(len(a_all))]), 1, device=device)
        paper += paper_epochs * (steps * t_step + t_eval)
    return {"width": width, "images": n, "mi_epochs": mi_epochs,
            "encoder_forwards_per_image": seen["images"] / n, "estimation_s": total,
            "paper_setting_extrapolated_s": paper}


def bench_downstream(device, epochs, repeats, n=10000, dim=512, classes=10):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = torch.nn.functional.normalize(centers[labels] + 2 * torch.randn(n, dim, generator=g), dim=1)
    test = torch.nn.functional.normalize(centers[labels] + 2 * torch.randn(n, dim, generator=g), dim=1)
    triggered = torch.nn.functional.normalize(centers[0] + 2 * torch.randn(n, dim, generator=g), dim=1)
    feats, test, triggered, labels_d = feats.to(device), test.to(device), triggered.to(device), labels.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def real(clf, opt, epoch):
        """Exactly what the script does per epoch: train, then evaluate clean and triggered."""
        sync()
        t0 = time.perf_counter()
        downstream.train_one_epoch(clf, feats, labels_d, opt, 64, 0, epoch)
        backdoor_metrics(downstream.predict(clf, test).cpu(), downstream.predict(clf, triggered).cpu(), labels, 0)
        sync()
        return time.perf_counter() - t0

    def model_only(clf, opt, epoch):
        """The model compute alone: the same batches, gathered beforehand (untimed); the training
        steps, then the evaluation's forward passes. -> (training seconds, evaluation seconds)."""
        batches = [(feats[i], labels_d[i]) for i in index_batches(n, 64, 0, epoch, drop_last=False)]
        clf.train()
        sync()
        t0 = time.perf_counter()
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        t1 = time.perf_counter()
        clf.eval()
        with torch.no_grad():
            clf(test).argmax(dim=1), clf(triggered).argmax(dim=1)
        sync()
        return t1 - t0, time.perf_counter() - t1

    torch.manual_seed(0)
    clf = DownstreamClassifier(dim, classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-4)
    real(clf, opt, 0), model_only(clf, opt, 0)        # warm-up
    ratios, training_ratios, t_real, t_train, t_eval = [], [], [], [], []
    for r in range(repeats):         # each epoch both ways on the same classifier, interleaved
        times = [(real(clf, opt, e), *model_only(clf, opt, e)) for e in range(r * epochs + 1, (r + 1) * epochs + 1)]
        real_s, train_s, eval_s = (sum(column) for column in zip(*times))
        ratios.append(real_s / (train_s + eval_s))
        training_ratios.append(real_s / train_s)
        t_real.append(real_s / epochs), t_train.append(train_s / epochs), t_eval.append(eval_s / epochs)
    return {"epochs_per_repeat": epochs, "features": n, "real_epoch_s": float(np.median(t_real)),
            "training_epoch_s": float(np.median(t_train)), "evaluation_epoch_s": float(np.median(t_eval)),
            "ratio": spread(ratios), "ratio_to_training_only": spread(training_ratios),
            "real_1000_epochs_s": float(np.median(t_real)) * 1000}


def bench_input_pipeline(device, width, batch, steps, repeats):
    torch.manual_seed(0)
    model = SimCLR(width=width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = ViewLoader(images(batch * steps), batch, MEAN, STD, device)

    views = list(loader)                       # pre-augmented, for the model-only rate
    simclr_step(model, opt, *views[0])                      # warm-up
    ratios, real_rate, model_rate = [], [], []
    n = batch * steps
    for _ in range(repeats):                   # alternate so machine-speed drifts hit both
        t0 = time.perf_counter()
        for v1, v2 in loader:
            simclr_step(model, opt, v1, v2)
        t_real = time.perf_counter() - t0
        t0 = time.perf_counter()
        for v1, v2 in views:
            simclr_step(model, opt, v1, v2)
        t_model = time.perf_counter() - t0
        ratios.append(t_model / t_real)
        real_rate.append(n / t_real), model_rate.append(n / t_model)
    return {"width": width, "batch": batch, "workers": 0, "augment": "batched",
            "real_images_per_s": float(np.median(real_rate)), "model_only_images_per_s": float(np.median(model_rate)),
            "ratio": spread(ratios)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--width", type=int, default=None, help="ResNet width (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the figures in docs/performance.md name theirs (default: 1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeats of each ratio, reported as median and min-max (default: 5)")
    parser.add_argument("--downstream_epochs", type=int, default=20,
                        help="classifier epochs timed per repeat; the 1,000-epoch time is scaled from them, each "
                             "epoch being the same work (default: 20)")
    parser.add_argument("--out", default="output/benchmark.json", help="JSON output (default: output/benchmark.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    width = args.width or (64 if device.type == "cuda" else 16)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, width {width}, "
          f"{args.repeats} repeats (median, min-max)")
    results = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "repeats": args.repeats, "machine": platform.processor() or platform.machine()}
    results["mimic_step"] = r = bench_mimic_step(device, width, 128, args.repeats)
    print(f"1. MIMIC step / minimum work: {show(r['ratio'])}  ({r['full_step_s']:.3f} s vs {r['minimum_s']:.3f} s)")
    results["mi_estimation"] = r = bench_mi(device, width, 512, mi_epochs=5)
    print(f"2. MI: {r['encoder_forwards_per_image']:.2f} encoder forwards per image; {r['estimation_s']:.1f} s "
          f"for {r['images']} images x {r['mi_epochs']} epochs; paper setting extrapolated "
          f"{r['paper_setting_extrapolated_s'] / 60:.1f} min")
    results["downstream"] = r = bench_downstream(device, args.downstream_epochs, args.repeats)
    print(f"3. downstream: {r['real_epoch_s']:.3f} s per epoch (1,000 epochs: {r['real_1000_epochs_s']:.0f} s); "
          f"/ model compute (training {r['training_epoch_s']:.3f} s + evaluation {r['evaluation_epoch_s']:.3f} s) "
          f"= {show(r['ratio'])}; / training alone = {show(r['ratio_to_training_only'])}")
    results["input_pipeline"] = r = bench_input_pipeline(device, width, 128, 6, args.repeats)
    print(f"4. stage 0 input pipeline: {r['real_images_per_s']:.0f} img/s real vs "
          f"{r['model_only_images_per_s']:.0f} img/s model-only = {show(r['ratio'])}")
    rows = [("MIMIC step / minimum work", show(results["mimic_step"]["ratio"]), "<= 1.1"),
            ("encoder forwards per clean image (MI)",
             f"{results['mi_estimation']['encoder_forwards_per_image']:.2f}", "= 1"),
            ("paper MI estimation, extrapolated (min)",
             f"{results['mi_estimation']['paper_setting_extrapolated_s'] / 60:.1f}", ""),
            ("downstream 1,000 epochs, 10,000 x 512, batch 64 (s)",
             f"{results['downstream']['real_1000_epochs_s']:.0f}", ""),
            ("downstream / model compute (training + evaluation)", show(results["downstream"]["ratio"]), "<= 1.3"),
            ("downstream / training compute alone", show(results["downstream"]["ratio_to_training_only"]), ""),
            ("stage 0 pipeline / model-only rate", show(results["input_pipeline"]["ratio"]), ">= 0.85")]
    print(f"\n{torch.get_num_threads()} threads; median (min-max) of {args.repeats} repeats")
    print("| figure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
