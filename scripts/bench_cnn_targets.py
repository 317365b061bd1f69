"""CNN targets check: profile, re-linearised DP pick per target (proxy arg, default magnitude), build with BN
re-estimation, ONNX parity, dense vs picks measured interleaved.  python scripts/bench_cnn_targets.py resnet50 224"""
import sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import numpy as np, torch
torch.set_num_threads(1)
from hwprune.models.cnn import CnnAdapter
from hwprune.latency import LatencyTable, DeviceFingerprint, get_backend, profile
from hwprune.latency.predictor_cnn import CnnPredictor, relinearized_dp
from hwprune.proxies.cnn_calib import load_cnn_calib
from hwprune.proxies.cnn import fit_cnn_proxy
from hwprune.export.candidate import candidate_onnx, timing_feed, check_parity, check_onnx
from hwprune.export.measure import measure_dense_and_pruned
name, size = sys.argv[1], int(sys.argv[2]); proxy = sys.argv[3] if len(sys.argv) > 3 else "magnitude"
a = CnnAdapter(name, input_shape=f"1,3,{size},{size}"); space = a.space()
be = get_backend("ort-cpu", threads=1)
t0 = time.time()
table = profile(a, runtime="ort-cpu", threads=1, batch=1, seq=size, space=space, out=f"bench_out/{name}_{size}_table.parquet", progress=False)
t_prof = time.time() - t0
pred = CnnPredictor(table, space)
calib = load_cnn_calib(a, None, n_calib=32, n_heldout=8)
t0 = time.time(); st = fit_cnn_proxy(proxy, a, space, calib, threads=1); t_fit = time.time() - t0
models, preds = {}, {}
for t in (1.5, 2.0, 3.0):
    cand, _ = relinearized_dp(pred, st.unit_errors(), pred.dense_ms() / (t * 1.01))
    m = st.build(cand)
    models[f"{t:g}"] = candidate_onnx(a, m, batch=1, seq=size); preds[f"{t:g}"] = pred.predict(cand)
    check_onnx(models[f"{t:g}"]); check_parity(a, m, models[f"{t:g}"], backend=be, seq=size, tol=1e-3)
dense = candidate_onnx(a, a.dense(), batch=1, seq=size)
cmp = measure_dense_and_pruned(be, dense=dense, pruned=models, feed=timing_feed(a, batch=1, seq=size), rounds=7, repeats=20)
out = {"model": name, "profile_seconds": round(t_prof, 1), "fit_seconds": round(t_fit, 1), "dense_pred": pred.dense_ms(), "dense_meas": cmp.dense.median_ms, "targets": {}}
for k in models:
    s = cmp.speedup(k)
    out["targets"][k] = {"predicted_ms": round(preds[k], 3), "measured_ms": round(cmp.pruned[k].median_ms, 3), "predicted_speedup": round(pred.dense_ms() / preds[k], 3), "measured_speedup": round(s, 3), "ok": s >= 0.97 * float(k)}
print(json.dumps(out, indent=1))
json.dump(out, open(f"bench_out/targets_{name}.json", "w"), indent=1)
