import numpy as np
import onnx
import torch

from medssl.core.onnx import export_onnx, parity
from medssl.models.classifier import Classifier, ExportModel


def test_onnx_parity_dynamic_batch_and_uint8_input(tmp_path, dermamnist):
    clf = Classifier("mobilenet_v2", 7, mean=[0.76, 0.54, 0.56], std=[0.14, 0.15, 0.17],
                     gen=torch.Generator().manual_seed(0)).eval()
    model = ExportModel(clf, image_size=64).eval()
    with np.load(dermamnist) as z:
        images = z["val_images"][:64]
    proto = export_onnx(model, images[:2])
    graph = proto.graph
    inp = graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.shape.dim] == ["batch", 28, 28, 3]
    check = parity(model, proto, images)  # 64 images, batch size different from the export example
    assert check["parity_images"] == 64
    assert check["parity_max_abs_diff"] < 1e-4 and check["parity_label_agreement"] == 1.0
    assert parity(model, proto, images[:1])["parity_max_abs_diff"] < 1e-4
