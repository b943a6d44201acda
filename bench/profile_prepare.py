"""Where a request's CPU work before the engine goes: ``python -m bench.profile_prepare CHECKPOINT``.

The benchmark's image (1280x704 random pixels, a 3.6 MB base64 PNG as the smoke run sends it) through
the steps the service runs before a prefill: base64, PNG decode, chat template, image processor,
positions (``Engine.prepare`` = template + processor + positions), each the median of 10, in a fresh
process and again once the engine has started on the GPU (threads and libraries it sets up may
change CPU timings). Prints one table; nothing here is used by the service.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    from service.engine import Engine
    from service.engine.loading import load_processor
    from service.api.media import decode_image
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=args.checkpoint, warmup=False)
    pixels = np.random.default_rng(0).integers(0, 255, (704, 1280, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    png = buf.getvalue()
    text64 = base64.b64encode(png).decode()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]}]
    processor = load_processor(Path(args.checkpoint))
    rows = [("image processor class / torch threads", f"{type(processor.image_processor).__name__} / "
                                                       f"{torch.get_num_threads()}")]

    def steps(label: str, engine=None) -> None:
        import pybase64

        rows.append((f"{label}: base64 (pybase64)", f"{median_ms(lambda: pybase64.b64decode(text64)):.1f} ms"))
        rows.append((f"{label}: PNG decode (service/api/media.py)", f"{median_ms(lambda: decode_image(png, settings)):.1f} ms"))
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append((f"{label}: chat template", f"{median_ms(lambda: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)):.1f} ms"))
        rows.append((f"{label}: image processor", f"{median_ms(lambda: processor.image_processor(images=[image], return_tensors='pt')):.1f} ms"))
        rows.append((f"{label}: processor (text + image)", f"{median_ms(lambda: processor(text=[text], images=[image], return_tensors='pt')):.1f} ms"))
        if engine is not None:
            rows.append((f"{label}: Engine.prepare", f"{median_ms(lambda: engine.prepare(messages, [image], max_tokens=8)):.1f} ms"))

    steps("fresh process")
    engine = Engine.load(settings)
    engine.start()
    steps("engine started", engine)
    engine.stop()
    print("\n| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
