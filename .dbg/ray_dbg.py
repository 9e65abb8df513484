import json, os, sys, time, tempfile
sys.path.insert(0, "/work/wt-scale/src")
import easy_vqa
import ray
actors = int(sys.argv[1]); cpus = int(sys.argv[2])
d = tempfile.mkdtemp()
q, _, ids = easy_vqa.get_test_questions(); p = easy_vqa.get_test_image_paths()
with open(f"{d}/in.jsonl", "w") as f:
    for i in range(100, 112):
        f.write(json.dumps({"id": f"q{i}", "image": p[ids[i]], "instruction": q[i]}) + "\n")
t = time.time()
ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True,
         runtime_env={"env_vars": {"PYTHONPATH": "/work/wt-scale/src", "OMP_NUM_THREADS": "1"}})
print("init", time.time() - t, flush=True)
from instructblip.cli import main
code = main(["batch", f"{d}/in.jsonl", "-o", f"{d}/out.jsonl", "--ray", "--ray-actors", str(actors), "--batch-size", "4", "--num-beams", "1", "--max-new-tokens", "6"])
print("code", code, time.time() - t, flush=True)
print(open(f"{d}/out.jsonl").read()[:300])
ray.shutdown()
