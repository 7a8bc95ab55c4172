"""Pictures of what the model sees and how a run goes (matplotlib, Agg canvas, no display).

- `mask_figure`: a clip's frames, the teacher's CLS attention, each policy's kept tokens and the
  student's agreement with the teacher (``python -m umt_fast.visualize mask``).
- `run_report`: loss, lr, throughput, data time, skipped samples and MFU of a run's
  ``metrics.jsonl`` against step and wall time (``python -m umt_fast.visualize run``).
- `bench_report`: a pytest-benchmark JSON as a bar chart (``python -m umt_fast.visualize bench``).
- `training`: the mask figure written by the training loop every ``log.mask_figure_every_steps``.
- `overlay`, `render`: token overlays as plain arrays; figures to RGB arrays and PNG files.

Importing this package does not import matplotlib; its modules do.
"""
