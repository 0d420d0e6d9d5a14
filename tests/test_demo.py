"""run_local.sh's demo path end to end with a very small configuration (the real demo takes minutes)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_generates_trains_evaluates_and_prints_the_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DEMO_DATA=str(tmp_path / "data"), DEMO_RUN=str(tmp_path / "run"), DEMO_TRAIN="4",
               DEMO_VAL="2", DEMO_HEIGHT="64", DEMO_WIDTH="128", DEMO_CROP="64,128", DEMO_BS="2", DEMO_STEPS="3")
    done = subprocess.run([os.path.join(REPO, "run_local.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "mean IoU" in done.stdout and "pixel accuracy" in done.stdout
    predictions = tmp_path / "run" / "predictions"
    assert f"colorized predictions: {predictions}" in done.stdout
    assert len([name for name in os.listdir(predictions) if name.endswith(".png")]) == 2
    assert len(os.listdir(predictions / "labelIds")) == 2
    assert (tmp_path / "run" / "snapshots" / "CS_scenes_3.pth").is_file()
    result = json.loads((predictions / "result.json").read_text())
    assert result["num_images"] == 2 and result["recurrence"] == 2
