"""End to end: the four published commands, extra flags appended, on tiny generated npz data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import SimCLR

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TRIGGER = "trigger/trigger_pt_white_21_10_ap_replace.npz"
SMALL = ["--device", "cpu", "--width", "4"]


def run(args, cwd=ROOT):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def stages(tiny):
    """Run stage 0 -> 3 once; the tests below read what each stage wrote."""
    data = ["--data_dir", tiny / "data"]
    out = tiny / "out"
    logs = {}
    logs["clean"] = run(["train_clean_encoder.py", "--lr", "1e-3", "--results_dir", out / "clean",
                         *data, "--epochs", "2", "--batch_size", "16", "--save_freq", "5", *SMALL])
    logs["bad"] = run(["train_badencoder.py", "--trigger_file", TRIGGER, "--reference_file", tiny / "priority.npz",
                       "--pretraining_dataset", "cifar10", "--downstreamTask", "gtsrb",
                       "--pretrained_encoder", out / "clean/model_2.pth", "--results_dir", out / "bad",
                       *data, "--epochs", "2", "--batch_size", "16", "--device", "cpu"])
    logs["mimic"] = run(["MIMIC.py", "--lr", "1e-2", "--batch_size", "16", "--epochs", "2",
                         "--pretraining_dataset", "cifar10", "--teacher", out / "bad/model_2.pth",
                         "--ratio", "0.5", "--results_dir", out / "mimic", *data, "--mi_epochs", "3",
                         "--device", "cpu"])
    logs["down"] = run(["training_downstream_classifier.py", "--dataset", "gtsrb", "--reference_label", "1",
                        "--trigger_file", TRIGGER, "--encoder_usage_info", "cifar10",
                        "--encoder", out / "mimic/model_2.pth", "--reference_file", tiny / "priority.npz",
                        "--nn_epochs", "3", *data, "--device", "cpu"])
    return out, logs


def read(path):
    return json.loads(Path(path).read_text())


def test_every_stage_writes_args_log_and_results(stages):
    out, _ = stages
    for stage in ("clean", "bad", "mimic", "mimic/downstream_gtsrb"):
        for name in ("args.json", "log.jsonl", "log.csv", "results.json"):
            assert (out / stage / name).is_file(), f"{stage}/{name}"
    for stage in ("clean", "bad", "mimic"):
        assert (out / stage / "model_2.pth").is_file()      # last epoch saved whatever --save_freq is
        assert [r["epoch"] for r in map(json.loads, (out / stage / "log.jsonl").read_text().splitlines())] == [1, 2]


def test_clean_encoder_logs_knn_and_is_self_describing(stages):
    out, _ = stages
    res = read(out / "clean/results.json")
    assert 0 <= res["knn_acc"] <= 100
    ckpt = torch.load(out / "clean/model_2.pth", weights_only=True)
    assert ckpt["arch"] == {"arch": "resnet18", "width": 4, "proj_dim": 128}
    assert ckpt["epoch"] == 2 and ckpt["args"]["lr"] == 1e-3 and "optimizer" in ckpt


def test_badencoder_trains_only_the_backbone(stages):
    out, _ = stages
    clean = torch.load(out / "clean/model_2.pth", weights_only=True)["state_dict"]
    bad = torch.load(out / "bad/model_2.pth", weights_only=True)
    assert bad["target_label"] == 1
    for k, v in clean.items():
        if k.startswith("g."):
            assert torch.equal(v, bad["state_dict"][k]), k          # head carried over unchanged
        elif k.endswith(("running_mean", "running_var")) or ".1." in k and k.startswith("f.f.1"):
            assert torch.equal(v, bad["state_dict"][k]), k          # BatchNorm frozen
    assert not torch.equal(clean["f.f.0.weight"], bad["state_dict"]["f.f.0.weight"])
    assert set(read(out / "bad/results.json")["final"]) >= {"loss", "loss0", "loss1", "loss2"}


def test_mimic_logs_and_stores_mi_and_weights(stages):
    out, logs = stages
    res = read(out / "mimic/results.json")
    assert list(res["mi"]) == ["layer1", "layer2", "layer3", "layer4"]
    mi = list(res["mi"].values())
    weights = list(res["attention_weights"].values())
    total = sum(mi)
    expected = [1000 + 10000 * m / total for m in mi] if total > 0 else [3500.0] * 4
    assert weights == pytest.approx(expected)
    assert "block    MI (nats)   AT weight" in logs["mimic"]
    mi_file = read(out / "mimic/mi.json")
    assert mi_file["mi_model"] == "teacher" and len(mi_file["history"]) == 4
    ckpt = torch.load(out / "mimic/model_2.pth", weights_only=True)
    assert ckpt["attention_weights"] == pytest.approx(expected)
    assert set(res["final"]) >= {"nce", "at", "clone"}


def test_downstream_reports_acc_and_both_asr(stages):
    out, logs = stages
    res = read(out / "mimic/downstream_gtsrb/results.json")
    assert res["target_label"] == 1 and res["epochs"] == 3 and len(res["curve"]) == 3
    for key in ("acc", "asr", "asr_excluding_target"):
        assert 0 <= res[key] <= 100
        assert res["curve"][-1][key] == res[key]
    assert f"ASR (all triggered test images)      {res['asr']:.2f}%" in logs["down"]
    assert "ASR excluding target-class images" in logs["down"]


def test_badencoder_release_checkpoint_as_teacher_and_encoder(tiny):
    model = SimCLR(width=4)
    path = tiny / "released.pth"
    torch.save({"epoch": 200, "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, path)
    data = ["--data_dir", tiny / "data", "--device", "cpu"]
    run(["MIMIC.py", "--teacher", path, "--ratio", "0.5", "--batch_size", "16", "--epochs", "1",
         "--mi_epochs", "1", "--results_dir", tiny / "released_mimic", *data])
    out = run(["training_downstream_classifier.py", "--dataset", "gtsrb", "--reference_label", "1",
               "--encoder", path, "--nn_epochs", "1", "--results_dir", tiny / "released_eval", *data])
    assert "ACC (clean test accuracy)" in out
    assert read(tiny / "released_mimic/results.json")["epochs"] == 1
