#!/usr/bin/env python3
"""Makes the external-data fixtures with torch's default export: `torch.onnx.export(model, args, path)`.

Run from this folder (CI does not run it; the files are committed):

    python3 -m venv /tmp/flvenv
    /tmp/flvenv/bin/pip install torch onnxscript onnx numpy
    /tmp/flvenv/bin/python make_torch_external.py ../../../tests/data/digits.csv.gz

Nothing is set beyond the model, the example input and the path: the exporter is the dynamo one
and `external_data=True`, torch's defaults from 2.9. Each export is the file pair torch writes:
`NAME.onnx` (the graph) and `NAME.onnx.data` (the weights). What the pair looked like (which
initializers the exporter put in the data file, at which offsets) is printed and written to
torch_external_layout.txt, the versions to torch_external_versions.txt.

- torch_mlp: digits MLP 64-32-10 (input `x` [n, 64] pixel values / 16, 10 class scores),
  fitted briefly on the first 200 rows only, so federated training has something left to do.
- torch_cnn: a small conv net on the same rows seen as 1x8x8 images (input [n, 1, 8, 8]).
"""
import gzip
import sys

import numpy as np
import onnx
import onnxscript
import torch

rows = np.loadtxt(gzip.open(sys.argv[1], "rt"), delimiter=",", dtype=np.float32)
X = torch.from_numpy(rows[:200, :64] / 16.0)
y = torch.from_numpy(rows[:200, 64].astype(np.int64))


def fit(net, xs):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs), y).backward()
        opt.step()
    return net.eval()


def layout(name):
    m = onnx.load(name, load_external_data=False)
    lines = [f"{name}: ops {[n.op_type for n in m.graph.node]}"]
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        where = f"external {ext}" if t.data_location == 1 else "inline"
        lines.append(f"  {t.name} {list(t.dims)} {where}")
    return lines


torch.manual_seed(0)
mlp = fit(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)), X)
torch.onnx.export(mlp, (X[:1],), "torch_mlp.onnx")

torch.manual_seed(0)
cnn = fit(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 10)), X.reshape(-1, 1, 8, 8))
torch.onnx.export(cnn, (X[:1].reshape(1, 1, 8, 8),), "torch_cnn.onnx")

lines = layout("torch_mlp.onnx") + layout("torch_cnn.onnx")
# Expected scores for the first rows, to check that the Rust side runs the same model.
with torch.no_grad():
    lines.append(f"torch_mlp scores row 0: {mlp(X[:1])[0].tolist()}")
    lines.append(f"torch_cnn scores row 0: {cnn(X[:1].reshape(1, 1, 8, 8))[0].tolist()}")
with open("torch_external_layout.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
versions = [f"torch {torch.__version__}", f"onnxscript {onnxscript.__version__}", f"onnx {onnx.__version__}"]
with open("torch_external_versions.txt", "w") as f:
    f.write("\n".join(versions) + "\n")
print("\n".join(lines + versions))
