"""The command line's options, as ``Annotated`` types the commands share.

Each shows a metavar that says what to type (``C,H,W``, ``FILE``, ``avg|max``) and, where its default is
decided at run time, a ``show_default`` text that typer prints as ``[default: (...)]``; options share a help
panel by what they are about, so that a command with many options groups them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# The help panels that group the options by what they are about (typer's own --help stays under "Options").
OUTPUT, LOADING, HEAD, VERIFICATION, REPORTS = "Output", "Loading and trust", "Head", "Verification", "Reports"
CLASSES = "Classes"

ArchOption = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        metavar="NAME",
        rich_help_panel=LOADING,
        help="torchvision model name (vgg16, resnet18), timm:NAME (timm:resnet18), hf:CLASS (a transformers class, "
        "built from the config.json beside the weights) or package.module:callable.",
    ),
]
InputShapeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        metavar="C,H,W",
        rich_help_panel=LOADING,
        show_default="3,224,224, unless the model records its own",
        help="Native input size C,H,W (or C,L / C,D,H,W; a single L for a model that takes (N, L) without a channel "
        "axis).",
    ),
]
DenseOption = Annotated[
    bool,
    typer.Option(
        "--dense",
        rich_help_panel=HEAD,
        help="Drop a global pooling before the head: return the per-position score map.",
    ),
]
PoolOption = Annotated[
    Optional[str],
    typer.Option(
        "--pool",
        metavar="avg|max",
        rich_help_panel=HEAD,
        help="avg or max: pool the score map over its positions, so the output is (N, K) at any input size.",
    ),
]
PointwiseOption = Annotated[
    bool,
    typer.Option(
        "--pointwise",
        rich_help_panel=HEAD,
        help="Also turn the trunk's Linear layers that act on each position of a channels-last map (ConvNeXt, "
        "Swin) into 1×1 convolutions, removing the permutations around them where that is exact.",
    ),
]
RankOption = Annotated[
    Optional[str],
    typer.Option(
        "--rank",
        metavar="R|FRACTION",
        rich_help_panel=HEAD,
        help="Make each fully connected layer two convolutions from its truncated SVD: rank R (an integer), or the "
        "fewest singular values keeping FRACTION of each layer's energy (0.99). An approximation: verified against "
        "the original with those weights truncated, and its deviation from the original is reported.",
    ),
]
StrideOption = Annotated[
    Optional[str],
    typer.Option(
        "--stride",
        metavar="S|S,S,…",
        rich_help_panel=HEAD,
        help="Score one window every S input pixels instead of every total stride (32 for VGG16 and ResNet): S "
        "divides the total stride, one for every axis or one per axis. The trunk is rewritten à trous (the last "
        "strides removed, later layers dilated), exactly; verified against the original's own layers read à trous.",
    ),
]
LogitsOption = Annotated[
    bool,
    typer.Option(
        "--logits",
        rich_help_panel=HEAD,
        help="Drop the softmax, log-softmax or sigmoid each output ends in: the map holds the raw scores.",
    ),
]
UntilOption = Annotated[
    Optional[str],
    typer.Option(
        "--until",
        metavar="LAYER",
        rich_help_panel=HEAD,
        help="End the model at this layer of the head (e.g. classifier.4): the output is its dense feature map. "
        "inspect lists the layers it accepts.",
    ),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust",
        rich_help_panel=LOADING,
        help="Load a whole pickled module, or an ExportedProgram holding pickled objects (runs code from the file; "
        "trusted files only).",
    ),
]
DtypeOption = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        rich_help_panel=LOADING,
        show_default="the checkpoint's",
        help="Convert in this dtype: float32, float16 or float64.",
    ),
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
        metavar="HxW,...",
        rich_help_panel=VERIFICATION,
        show_default="native, 1.25-1.5×, 2×",
        help="Spatial sizes to check, e.g. 224x224,320x480 (1000,1301 in 1D; 16x112x112 in 3D).",
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        rich_help_panel=VERIFICATION,
        help="Where the PyTorch models run during verification: cpu or cuda (TF32 off).",
    ),
]
RtolOption = Annotated[
    Optional[float],
    typer.Option(
        "--rtol",
        metavar="FLOAT",
        rich_help_panel=VERIFICATION,
        show_default="1e-4 in float32",
        help="Allowed error relative to the output's largest magnitude.",
    ),
]
AtolOption = Annotated[
    float,
    typer.Option(
        "--atol",
        metavar="FLOAT",
        rich_help_panel=VERIFICATION,
        help="Allowed absolute error, added to rtol × magnitude.",
    ),
]
JsonOption = Annotated[
    Optional[Path],
    typer.Option(
        "--json",
        metavar="FILE",
        rich_help_panel=REPORTS,
        help="Also write the report as JSON (schema fcconv.report/1), on a pass or a fail.",
    ),
]
JunitOption = Annotated[
    Optional[Path],
    typer.Option(
        "--junit",
        metavar="FILE",
        rich_help_panel=REPORTS,
        help="Also write the report as JUnit XML, on a pass or a fail.",
    ),
]

# convert
CheckpointArgument = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
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
        metavar="FILE",
        rich_help_panel=OUTPUT,
        show_default="NAME.fcn.onnx beside MODEL",
        help="File to write: NAME.onnx, NAME.pt2 (a torch.export program) or NAME.safetensors (the converted "
        "state_dict); no other suffix.",
    ),
]
HeadFormatOption = Annotated[
    str,
    typer.Option(
        "--head-format",
        metavar="conv|gemm",
        rich_help_panel=OUTPUT,
        help="conv: the head as Conv nodes; gemm: as GEMMs over all windows (faster in onnxruntime at batch > 1).",
    ),
]
OnnxExporterOption = Annotated[
    str,
    typer.Option(
        "--onnx-exporter",
        metavar="EXPORTER",
        rich_help_panel=OUTPUT,
        help="torch.onnx's exporter: dynamo (built on torch.export; nodes named after their modules), "
        "torchscript (deprecated; generic node names), or auto: dynamo, and torchscript where dynamo fails, "
        "with a warning and the reason in the metadata.",
    ),
]
ExternalDataOption = Annotated[
    bool,
    typer.Option(
        "--external-data",
        rich_help_panel=OUTPUT,
        show_default="only above protobuf's 2 GiB",
        help="Write the weights to NAME.onnx.data beside the file.",
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
        "--reference",
        metavar="FILE",
        rich_help_panel=LOADING,
        help="The original checkpoint (or ONNX classifier) to compare against.",
        readable=False,
    ),
]
DenseAsConvertedOption = Annotated[
    Optional[bool],
    typer.Option(
        "--dense/--no-dense",
        rich_help_panel=HEAD,
        show_default="from its metadata",
        help="How the model was converted.",
    ),
]
PoolAsConvertedOption = Annotated[
    Optional[str],
    typer.Option(
        "--pool",
        metavar="avg|max|none",
        rich_help_panel=HEAD,
        show_default="from its metadata",
        help="How the model was converted.",
    ),
]
LogitsAsConvertedOption = Annotated[
    Optional[bool],
    typer.Option(
        "--logits/--no-logits",
        rich_help_panel=HEAD,
        show_default="from its fcconv.logits metadata",
        help="How the model was converted.",
    ),
]
UntilAsConvertedOption = Annotated[
    Optional[str],
    typer.Option(
        "--until",
        metavar="LAYER",
        rich_help_panel=HEAD,
        show_default="from its fcconv.until metadata",
        help="How the model was converted.",
    ),
]

# check
ExportsArgument = Annotated[
    list[Path],
    typer.Argument(
        metavar="MODEL",
        help="ONNX models (fcconv's exports or others), or .pt2 programs and .safetensors weights fcconv wrote.",
        readable=False,
    ),
]
RecordedShapeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        metavar="C,H,W",
        rich_help_panel=LOADING,
        show_default="its fcconv.input_shape metadata, else its input's fixed size",
        help="Native input size C,H,W (or C,L / C,D,H,W / L).",
    ),
]
RebuildFromOption = Annotated[
    Optional[Path],
    typer.Option(
        "--reference",
        metavar="FILE",
        rich_help_panel=LOADING,
        show_default="digest only",
        help="The original checkpoint: a .safetensors file is rebuilt from it and run.",
        readable=False,
    ),
]

# heatmap
HeatmapModelArgument = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="A checkpoint (converted in memory) or an ONNX file written by fcconv convert.",
        readable=False,
    ),
]
ImageArgument = Annotated[
    Path,
    typer.Argument(metavar="IMAGE", help="The picture, any size at least the model's native one.", readable=False),
]
PngOption = Annotated[
    Optional[Path],
    typer.Option(
        "-o",
        "--output",
        metavar="FILE.png",
        rich_help_panel=OUTPUT,
        show_default="IMAGE-NAME.heatmap.png beside IMAGE",
        help="PNG to write.",
    ),
]
ClassOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--class",
        metavar="NAME",
        rich_help_panel=CLASSES,
        show_default="the --top classes",
        help="Draw this class's map (repeat for several panels).",
    ),
]
TopOption = Annotated[
    Optional[int],
    typer.Option(
        "--top",
        metavar="K",
        rich_help_panel=CLASSES,
        show_default="3",
        help="Draw the K classes most probable anywhere in the picture, one panel each.",
    ),
]
SaveMapOption = Annotated[
    Optional[Path],
    typer.Option(
        "--save-map",
        metavar="FILE.npy",
        rich_help_panel=OUTPUT,
        help="Also write every class's probability map, K×h×w float32, as .npy.",
    ),
]

# fcconv map
MapModelArgument = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="An ONNX file written by fcconv convert, or a checkpoint (converted and verified first, densely).",
        readable=False,
    ),
]
MapInputArgument = Annotated[
    Path,
    typer.Argument(
        metavar="INPUT",
        help="A .npy array (C, *S) or (*S), a zarr array, a TIFF or BigTIFF, a WAV file, or a picture.",
        readable=False,
    ),
]
MapOutputOption = Annotated[
    Path, typer.Option("-o", "--output", metavar="OUT.npy", help="The map, K×positions, float32.")
]
TileOption = Annotated[
    Optional[str],
    typer.Option(
        "--tile",
        metavar="N|N,N,…",
        help="Input pixels per axis a tile reads, its overlap included (default: as large as the overlap calls "
        "for within 2 GiB of activations per tile, less where memory is short, one tile per core where that is "
        "faster).",
    ),
]
SchedulerOption = Annotated[
    Optional[str],
    typer.Option(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="Run the tiles on this Dask cluster (the model and input readable by its workers at the same "
        "paths); default: threads on this machine.",
    ),
]
WorkersOption = Annotated[
    Optional[int], typer.Option("--workers", metavar="N", help="Threads on this machine (default: one per core).")
]
