"""The command line's options, as ``Annotated`` types the commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ArchOption = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="torchvision model name (vgg16, resnet18), timm:NAME (timm:resnet18), hf:CLASS (a transformers class, "
        "built from the config.json beside the weights) or package.module:callable.",
    ),
]
InputShapeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        help="Native input size C,H,W (or C,L / C,D,H,W; a single L for a model that takes (N, L) without a channel "
        "axis). [default: 3,224,224]",
    ),
]
DenseOption = Annotated[
    bool, typer.Option("--dense", help="Drop a global pooling before the head: return the per-position score map.")
]
PoolOption = Annotated[
    Optional[str],
    typer.Option(
        "--pool",
        help="avg or max: pool the score map over its positions, so the output is (N, K) at any input size.",
    ),
]
PointwiseOption = Annotated[
    bool,
    typer.Option(
        "--pointwise",
        help="Also turn the trunk's Linear layers that act on each position of a channels-last map (ConvNeXt, "
        "Swin) into 1×1 convolutions, removing the permutations around them where that is exact.",
    ),
]
LogitsOption = Annotated[
    bool,
    typer.Option(
        "--logits",
        help="Drop the softmax, log-softmax or sigmoid each output ends in: the map holds the raw scores.",
    ),
]
UntilOption = Annotated[
    Optional[str],
    typer.Option(
        "--until",
        metavar="LAYER",
        help="End the model at this layer of the head (e.g. classifier.4): the output is its dense feature map. "
        "inspect lists the layers it accepts.",
    ),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Load a whole pickled module, or an ExportedProgram holding pickled objects (runs code from the file; "
        "trusted files only).",
    ),
]
DtypeOption = Annotated[
    Optional[str],
    typer.Option("--dtype", help="Convert in this dtype: float32, float16 or float64. [default: the checkpoint's]"),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No tables, spinners or progress bars: only the result line and errors."),
]
SizesOption = Annotated[
    Optional[str],
    typer.Option(
        "--sizes",
        help="Spatial sizes to check, e.g. 224x224,320x480 (1000,1301 in 1D; 16x112x112 in 3D). "
        "[default: native, 1.25-1.5×, 2×]",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where the PyTorch models run during verification: cpu or cuda (TF32 off).")
]
RtolOption = Annotated[
    Optional[float],
    typer.Option("--rtol", help="Allowed error relative to the output's largest magnitude. [default: 1e-4 in float32]"),
]
AtolOption = Annotated[float, typer.Option("--atol", help="Allowed absolute error, added to rtol × magnitude.")]
JsonOption = Annotated[
    Optional[Path],
    typer.Option("--json", help="Also write the report as JSON (schema fcconv.report/1), on a pass or a fail."),
]
JunitOption = Annotated[
    Optional[Path], typer.Option("--junit", help="Also write the report as JUnit XML, on a pass or a fail.")
]

# convert
CheckpointArgument = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: a state_dict (.pt, .pth, .bin, .safetensors), an ExportedProgram (.pt2), a classifier "
        "exported to ONNX (.onnx) or, with --trust, a pickled module.",
        readable=False,
    ),
]
OutputOption = Annotated[
    Optional[Path],
    typer.Option(
        "-o",
        "--output",
        help="File to write: NAME.onnx, NAME.pt2 (a torch.export program) or NAME.safetensors (the converted "
        "state_dict). [default: NAME.fcn.onnx beside MODEL]",
    ),
]
HeadFormatOption = Annotated[
    str,
    typer.Option(
        "--head-format",
        help="conv: the head as Conv nodes; gemm: as GEMMs over all windows (faster in onnxruntime at batch > 1).",
    ),
]
ExternalDataOption = Annotated[
    bool,
    typer.Option(
        "--external-data",
        help="Write the weights to NAME.onnx.data beside the file. [default: only above protobuf's 2 GiB]",
    ),
]

# verify
ExportArgument = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="What fcconv convert wrote: MODEL.onnx, MODEL.pt2 or MODEL.safetensors (rebuilt from the reference).",
        readable=False,
    ),
]
OriginalOption = Annotated[
    Path,
    typer.Option(
        "--reference", help="The original checkpoint (or ONNX classifier) to compare against.", readable=False
    ),
]
DenseAsConvertedOption = Annotated[
    Optional[bool],
    typer.Option("--dense/--no-dense", help="How the model was converted. [default: from its metadata]"),
]
PoolAsConvertedOption = Annotated[
    Optional[str],
    typer.Option("--pool", help="avg, max or none: how the model was converted. [default: from its metadata]"),
]
LogitsAsConvertedOption = Annotated[
    Optional[bool],
    typer.Option(
        "--logits/--no-logits", help="How the model was converted. [default: from its fcconv.logits metadata]"
    ),
]
UntilAsConvertedOption = Annotated[
    Optional[str],
    typer.Option(
        "--until", metavar="LAYER", help="How the model was converted. [default: from its fcconv.until metadata]"
    ),
]

# check
ExportsArgument = Annotated[
    list[Path],
    typer.Argument(
        metavar="MODEL...",
        help="ONNX models (fcconv's exports or others), or .pt2 programs and .safetensors weights fcconv wrote.",
        readable=False,
    ),
]
RecordedShapeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        help="Native input size C,H,W (or C,L / C,D,H,W / L). [default: the model's fcconv.input_shape metadata, else "
        "its input's fixed size]",
    ),
]
RebuildFromOption = Annotated[
    Optional[Path],
    typer.Option(
        "--reference",
        help="The original checkpoint: a .safetensors file is rebuilt from it and run. [default: digest only]",
        readable=False,
    ),
]

# heatmap
HeatmapModelArgument = Annotated[
    Path,
    typer.Argument(
        help="A checkpoint (converted in memory) or an ONNX file written by fcconv convert.", readable=False
    ),
]
ImageArgument = Annotated[
    Path, typer.Argument(help="The picture, any size at least the model's native one.", readable=False)
]
PngOption = Annotated[
    Optional[Path],
    typer.Option("-o", "--output", help="PNG to write. [default: IMAGE-NAME.heatmap.png beside IMAGE]"),
]
ClassOption = Annotated[
    Optional[list[str]],
    typer.Option("--class", help="Draw this class's map (repeat for several panels). [default: the --top classes]"),
]
TopOption = Annotated[
    Optional[int],
    typer.Option(
        "--top", help="Draw the K classes most probable anywhere in the picture, one panel each. [default: 3]"
    ),
]
SaveMapOption = Annotated[
    Optional[Path],
    typer.Option("--save-map", help="Also write every class's probability map, K×h×w float32, as .npy."),
]
