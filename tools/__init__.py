"""The user tools: scripts run as `python tools/NAME.py` (predict, attention, export_onnx, plot_logs, benchmark)
and detector.py, the code they share. Nothing below tools/ (models, datasets, util, main.py) imports from here,
and no script here imports another: what two scripts need lives in tools/detector.py."""
