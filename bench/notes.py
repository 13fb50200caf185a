"""The prose of docs/benchmarks.md that no single number produces (kept beside the code that
writes the numbers, so a re-run never loses it)."""

NOTES = {
    "caveat": """
**Read the ratios, not the absolute numbers.** This machine's 2 cores are shared with other
work: the absolute rates move with its load (the load average above; the in-process
measurement is repeated after the served part to show the drift). The in-process limit and the
served rates are measured in the same run, minutes apart, so their ratio is the result. The
client that generates the load runs on the same 2 cores as the frontend and Triton, which
charges its cost to the stack. Inputs are the five sample photos of `examples/images/`, resized
at bench time to each size with a little noise added (a plain upscale compresses far better than
a camera photo) and saved as JPEG quality 90; the models are ViT-B/16 (`ViTConfig()` defaults,
random weights, the processor settings of `google/vit-base-patch16-224`: the real model's cost)
and a tiny ViT, both built locally (there is no model hub here).
""",
    "overhead": """
### The largest item, and what was done about it

On 2 cores every microsecond of the stack is taken from the model. The single-image path pays
per request: an HTTP request to the frontend, JSON with base64 (parsing, base64 decoding, the
PIL header check in a thread), a Triton HTTP request (binary tensors, keep-alive, one shared
async client per worker, requests are not serialised: the client has up to 100 connections),
the dynamic batcher, and the Python backend's shared-memory hop. A large request pays these per
chunk instead of per image, which is why it is the cheapest path per image.

The model's own decoding is the largest item that grows with the input: see the image-size table,
where draft decoding takes a 4000x3000 JPEG from tens of milliseconds to a few. For ViT-B/16 the
whole stack is a few milliseconds per image against a forward pass of about 130 ms (bf16), so
serving reaches the model's limit within the measurement's noise.
""",
    "queue_delay": """
Choice: the committed `max_queue_delay_microseconds: 2000`. On the CPU, one ViT-B/16 batch takes
hundreds of milliseconds, so under load batches fill from the queue while the instance is busy
and the delay only matters when the instance is idle: a lone request then waits up to the delay
for company. 2 ms is under 2% of a single image's forward pass, so it costs a lone client
nothing measurable, while on a GPU (forward passes of a few milliseconds) it lets concurrent
requests meet. 10 ms did not add throughput here. `preferred_batch_size` is not set, as
Triton's documentation advises for most models.
""",
    "fast": """
## What makes it fast

- **Reduced precision.** `IEI_DTYPE=auto` loads the weights in bf16 on CPUs with native bf16
  (AVX-512 BF16 or AMX, read from `/proc/cpuinfo`), fp16 on CUDA, else fp32; the cosine to
  fp32 is in the summary. Weights in bf16 run slightly faster than autocast.
- **Reduced-scale JPEG decoding.** `model.py` reads the processor's target size in
  `initialize` and decodes a JPEG that is at least twice as large on both sides at 1/2, 1/4 or
  1/8 scale (libjpeg's DCT scaling), never below 2x the processor's input side (448 px for a
  224 px model, 512 for DeiT/ConvNeXt's 256 px resize), so the processor's own resize still
  does the final antialiasing. Files of up to about 900 px on a side decode in full, bit for bit
  as before (the integration tests compare them with an independent full decode at cosine
  0.9999). `IEI_JPEG_DRAFT=false` turns it off.
- **One batched forward per Triton execution**, under `torch.inference_mode`, in sub-batches
  of `IEI_FORWARD_BATCH_SIZE`; decoding runs in a thread pool (PIL releases the GIL); the
  processor runs once over the batch; instances x threads <= cores.
- **Transport.** The frontend sends raw bytes as Triton binary tensors over one keep-alive
  async client per worker; a request's chunks go to Triton concurrently up to
  `IEI_CONCURRENCY_LEVEL` images; many requests are merged by Triton's dynamic batcher.
""",
    "gpu": """
## GPU

**No GPU was available for this work: there are no GPU numbers here.** The GPU path is written
and its functions are tested on the CPU, but it has not been measured or run on a GPU: the
instance moves to `cuda:<device id>` (`KIND_GPU`), `IEI_DTYPE=auto` picks fp16 there, and
the preprocessed batch is copied to the device once per sub-batch with `non_blocking=True`.
On a GPU, expect the picture to flip: the forward pass of ViT-B/16 takes a few milliseconds per
batch, so JPEG decoding on the CPU and the per-request hops become the limit; draft decoding,
large requests (or many concurrent ones) and more frontend workers matter more there, and the
queue delay should be re-measured (`python -m bench --queue-delays ...`) on that machine.
""",
    "original": """
## The original IEI service

Not measured: running it (lloydzhou/image-embedding-inference, transformers version at commit
107b3f1) needs its own environment, which this run did not set up within its time.
""",
}
