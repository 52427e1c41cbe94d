"""ACC, ASR and ASR excluding target-class images on a hand-made prediction set."""
import math

from models.metrics import backdoor_metrics


def test_hand_made_predictions():
    labels = [0, 1, 2, 3, 3, 1, 0, 2, 3, 1]          # target 3 is the true label of 3 images
    clean = [0, 1, 2, 3, 0, 1, 0, 0, 3, 2]           # 7 of 10 right
    triggered = [3, 3, 2, 3, 3, 1, 0, 3, 3, 0]       # 6 of 10 hit the target, 3 of them target-class
    m = backdoor_metrics(clean, triggered, labels, target=3)
    assert math.isclose(m["acc"], 70.0)
    assert math.isclose(m["asr"], 60.0)
    assert math.isclose(m["asr_excluding_target"], 100.0 * 3 / 7)
