"""`python tests/helpers/plain_load.py LIB NAME NUM_CLASSES CHECKPOINT OUT.json [VAL RESIZE CROP]`

Loads a fastcls checkpoint's `model` entry into a plain torchvision (LIB=torchvision) or
timm (LIB=timm) model with the two lines of docs/inference.md, without importing fastcls,
and, given a VAL folder, scores it the plain torchvision way: ImageFolder, Resize(RESIZE),
CenterCrop(CROP), ToTensor-equivalent, Normalize(ImageNet mean/std), fp32 on the CPU.
Writes {"fastcls_imported", "keys", "top1", "images", "preds": {path: class index}}."""
import json
import sys

import torch

lib, name, num_classes, path, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
if lib == "torchvision":
    import torchvision
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
else:
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
# the two lines
state = torch.load(path, map_location="cpu", weights_only=True)
model.load_state_dict(state["model"])

result = {"keys": len(state["model"])}
if len(sys.argv) > 6:
    from torchvision import datasets
    from torchvision.transforms import v2
    val, resize, crop = sys.argv[6], int(sys.argv[7]), int(sys.argv[8])
    tf = v2.Compose([v2.Resize(resize), v2.CenterCrop(crop), v2.PILToTensor(),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(val, transform=tf)  # its loader converts to RGB
    model.eval()
    preds, correct = {}, 0
    with torch.no_grad():
        for i in range(0, len(ds), 32):
            items = [ds[j] for j in range(i, min(i + 32, len(ds)))]
            logits = model(torch.stack([x for x, _ in items]))
            for j, (p, (_, y)) in enumerate(zip(logits.argmax(1).tolist(), items)):
                preds[ds.samples[i + j][0]] = p
                correct += int(p == y)
    result.update(top1=100.0 * correct / len(ds), images=len(ds), preds=preds)
result["fastcls_imported"] = any(m.split(".")[0] == "fastcls" for m in sys.modules)  # at any point
with open(out, "w") as f:
    json.dump(result, f)
