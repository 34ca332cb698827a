"""Ask TorchServe why the classifier picked a class, and draw the answer over the photo.

    explain car.jpg --model efficientnet_lite0_cars
    explain car.jpg --model efficientnet_lite0_cars --target 3 --out heatmap.png --json
    explain car.jpg --model efficientnet_lite0_cars --url https://host:8443 --token "$TOKEN"

The image goes to ``{url}/explanations/{model}``; the handler answers with the top-1 class (or
``--target``) and an Integrated Gradients heat map of the model's input size, normalised to
[0, 1]. The PNG shows the plain photo next to the photo with the heat map stretched over it.
Stretching is right, not an approximation: the evaluation transform squashes the whole photo
to a square (carmodel/presets.py), so heat-map pixel (i, j) covers the same fraction of the
photo in both directions.

Exit status: 0 done; 2 bad local input; 3 TorchServe not reachable (or refused the token);
4 TorchServe answered with an error (or no heat map, or nothing within --timeout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from carmodel.errors import EXIT_SERVER
from client import add_server_arguments, server_client
from client.photos import (
    MAX_DISPLAY_SIDE,
    ClientError,
    exit_status,
    fit_for_display,
    load_display_image,
    read_image_bytes,
    save_answer,
)
from serving.client import TorchServeClient

# Perceptually uniform and dark at zero, so unimportant regions stay close to the photo's colours.
COLORMAP = "inferno"
EXPLAIN_TIMEOUT_S = 120  # Integrated Gradients runs the model ig_steps times


# ---------------------------------------------------------------------- HTTP


def request_explanation(
    client: TorchServeClient, model: str, image: bytes, filename: str = "image.jpg", target: int | None = None
) -> dict:
    """The handler's explanation of one image: {class_id, class_name, probability, heatmap}."""
    return parse_explanation(client.explain(model, image, target=target, filename=filename))


def parse_explanation(body) -> dict:
    # One image in, one object out; a one-element list is accepted should a batching setup wrap it.
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict) or "heatmap" not in body:
        raise ClientError(f"server answer has no heatmap: {str(body)[:200]}", EXIT_SERVER)
    return body


def heatmap_array(explanation: dict) -> np.ndarray:
    try:
        heatmap = np.asarray(explanation["heatmap"], dtype=np.float32)
    except (TypeError, ValueError):
        raise ClientError("heatmap is not a rectangular list of numbers", EXIT_SERVER) from None
    if heatmap.ndim != 2 or min(heatmap.shape) == 0:
        raise ClientError(f"heatmap should be 2-D, got shape {heatmap.shape}", EXIT_SERVER)
    return heatmap


# ---------------------------------------------------------------------- drawing


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (width, height) on floats, so no 8-bit banding creeps in."""
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def place_in_region(heatmap: np.ndarray, region, size: tuple[int, int]) -> np.ndarray:
    """A model that localises explains the car it cut out: its heat map belongs in that `region`
    ([x1, y1, x2, y2] of the photo), and the rest of the photo played no part."""
    try:
        x1, y1, x2, y2 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ClientError(f"region is not [x1, y1, x2, y2]: {region!r}", EXIT_SERVER) from None
    width, height = size
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ClientError(f"region {region} is not inside the {width}x{height} photo", EXIT_SERVER)
    # At most display resolution: a 12-megapixel photo needs no 12-megapixel heat map.
    scale = min(1.0, MAX_DISPLAY_SIDE / max(size))
    full = np.zeros((max(1, round(height * scale)), max(1, round(width * scale))), dtype=np.float32)
    left, top, right, bottom = (round(v * scale) for v in (x1, y1, x2, y2))
    full[top : max(bottom, top + 1), left : max(right, left + 1)] = resize_heatmap(
        heatmap, (max(right - left, 1), max(bottom - top, 1))
    )
    return full


def render_overlay(image: Image.Image, heatmap, title: str, out_path: Path, alpha: float = 0.5) -> Path:
    """Plain photo | photo with the heat map blended over it; saved as a PNG at `out_path`.

    `heatmap` is any 2-D array of values in [0, 1]; it is stretched to the photo, whatever its size.
    Needs no server, so it can be reused for attributions computed offline.
    """
    image = fit_for_display(image.convert("RGB"))
    heat = resize_heatmap(np.asarray(heatmap, dtype=np.float32), image.size)
    # Two panels side by side; width follows the photo's aspect so wide car crops are not letterboxed.
    panel_height = 4.0
    panel_width = panel_height * image.width / image.height
    # A Figure of its own on the Agg canvas: no pyplot, so no global figure state and no display needed.
    fig = Figure(figsize=(2 * panel_width + 1.2, panel_height + 0.9))
    FigureCanvasAgg(fig)
    plain_ax, overlay_ax = fig.subplots(1, 2)
    plain_ax.imshow(image)
    plain_ax.set_title("image", fontsize=10)
    overlay_ax.imshow(image)
    shown = overlay_ax.imshow(heat, cmap=COLORMAP, vmin=0.0, vmax=1.0, alpha=alpha)
    overlay_ax.set_title("Integrated Gradients attribution", fontsize=10)
    for ax in (plain_ax, overlay_ax):
        ax.axis("off")
    fig.colorbar(shown, ax=overlay_ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, format="png")
    return out_path


def explanation_title(explanation: dict, target: int | None) -> str:
    name = explanation.get("class_name", "?")
    class_id = explanation.get("class_id", "?")
    probability = explanation.get("probability")
    p = f"p = {probability:.1%}" if isinstance(probability, (int, float)) else "p = ?"
    why = "requested target" if target is not None else "top-1"
    return f"{name} (class {class_id}, {why}), {p}"


# ---------------------------------------------------------------------- CLI


def default_out_path(image_path: Path) -> Path:
    return Path.cwd() / f"{image_path.stem}_explained.png"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="a JPEG, PNG, WebP, ... photo of a car")
    parser.add_argument("--model", required=True, help="model name registered in TorchServe")
    parser.add_argument("--target", type=int, help="class id to explain instead of the top-1 prediction")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <image stem>_explained.png here)")
    parser.add_argument("--json", action="store_true", help="also write the server's answer next to the PNG")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in [0, 1] (default 0.5)")
    add_server_arguments(parser, timeout=EXPLAIN_TIMEOUT_S)
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    return args


def explain(args: argparse.Namespace) -> Path:
    data = read_image_bytes(args.image)
    with server_client(args) as client:
        explanation = request_explanation(client, args.model, data, args.image.name, target=args.target)
    heatmap = heatmap_array(explanation)
    image = load_display_image(data, str(args.image))
    if explanation.get("region") is not None:
        heatmap = place_in_region(heatmap, explanation["region"], image.size)
    out_path = args.out or default_out_path(args.image)
    render_overlay(image, heatmap, explanation_title(explanation, args.target), out_path, args.alpha)
    print(
        f"{explanation.get('class_name')} (class {explanation.get('class_id')}), "
        f"p={explanation.get('probability')}: wrote {out_path}"
    )
    if args.json:
        save_answer(out_path, explanation)
    return out_path


def main(argv=None) -> int:
    args = parse_args(argv)  # argparse itself exits 2 (EXIT_USAGE) on bad flags
    return exit_status(lambda: explain(args))


if __name__ == "__main__":
    sys.exit(main())
