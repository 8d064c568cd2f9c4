#!/usr/bin/env python3
"""Makes the exported-model fixtures of federated learning with the real exporters.

Run from this folder (CI does not run it; the .onnx files are committed):

    python3 -m venv /tmp/flvenv
    /tmp/flvenv/bin/pip install scikit-learn skl2onnx onnx torch
    /tmp/flvenv/bin/python make_fl_models.py ../../../tests/data/digits.csv.gz

Each model takes the 64 pixel values of a digits row (f32) and gives 10 class scores. They are
fitted briefly on the first 200 rows only, so federated training has something left to do.
The versions used are printed and written to versions.txt.
"""
import gzip
import sys

import numpy as np

import onnx
import sklearn
import skl2onnx
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier

rows = np.loadtxt(gzip.open(sys.argv[1], "rt"), delimiter=",", dtype=np.float32)
X, y = rows[:200, :64] / 16.0, rows[:200, 64].astype(np.int64)
versions = [f"onnx {onnx.__version__}", f"scikit-learn {sklearn.__version__}",
            f"skl2onnx {skl2onnx.__version__}"]


def save(model, name):
    onnx.checker.check_model(model)
    onnx.save(model, name)
    print(name, [n.op_type for n in model.graph.node])


# zipmap off: `probabilities` is a plain f32 tensor, not a list of maps.
opts = {"zipmap": False}
mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0).fit(X, y)
save(to_onnx(mlp, X[:1], options=opts, target_opset=17), "sklearn_mlp.onnx")
sgd = SGDClassifier(loss="log_loss", max_iter=3, tol=None, random_state=0).fit(X, y)
save(to_onnx(sgd, X[:1], options=opts, target_opset=17), "sklearn_sgd.onnx")
# skl2onnx writes LogisticRegression as ai.onnx.ml LinearClassifier (weights in attributes),
# with a SOFTMAX post-transform for this multinomial fit: edge_inference::trainable_form
# rewrites it into a Gemm layer for training.
logreg = LogisticRegression(max_iter=20).fit(X, y)
save(to_onnx(logreg, X[:1], options=opts, target_opset=17), "sklearn_logreg.onnx")

try:
    import torch
except ImportError:
    print("torch is not installed: no torch fixtures")
else:
    versions.append(f"torch {torch.__version__}")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    x = torch.from_numpy(X[:1])
    # The TorchScript exporter: Gemm with transB=1, weights [out, in].
    torch.onnx.export(net, (x,), "torch_gemm.onnx", dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    save(onnx.load("torch_gemm.onnx"), "torch_gemm.onnx")
    # The dynamo exporter (the default from torch 2.9), weights kept inside the file.
    prog = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
                             dynamic_shapes=({0: torch.export.Dim("n")},))
    prog.save("torch_dynamo.onnx", external_data=False)
    save(onnx.load("torch_dynamo.onnx"), "torch_dynamo.onnx")

with open("versions.txt", "w") as f:
    f.write("\n".join(versions) + "\n")
print("\n".join(versions))
