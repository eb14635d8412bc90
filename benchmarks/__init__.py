"""Measurements that print numbers, and the helpers they run on; each module's docstring says how to run it.

- attacks: what screening, the robust rules, DP and 16-bit transport cost and buy on the demo (accuracy under
  poisoned clients, utility against epsilon, float16/bfloat16 against float32, bytes per client per round).
- clientapp_start: what one message costs a deployed SuperNode that starts a fresh `flwr-clientapp` per message
  (imports, rebuilding the client's data, the work), against a bare Flower/torch import.
- demo_seeds: FedCLIP's gains over zero-shot CLIP on the demo over several seeds, with 95% confidence intervals.
- deployment: helper, not a measurement: a local, insecure SuperLink and SuperNodes for gpu_check and round_overhead.
- encoding: images/s of decoding and preprocessing, of CLIP feature encoding and of fedclip-predict, before and after
  parallel decoding.
- feature_cache: what the one-off feature cache saves: a local epoch re-encoding every image against one on cached features.
- first_run: whether the README's first command works every time, run several times back to back with a fresh FLWR_HOME.
- gpu_check: the whole federation deployed on one machine with a ViT-B/32-sized CLIP on PACS-sized data: encoding
  images/s, seconds per round, held-out accuracy, wall time.
- noop_app: helper, Flower's floor for round_overhead: a ServerApp/ClientApp sending FedCLIP's messages to the
  clients FedCLIP samples, doing no work.
- preprocessing: helper, images/s from image files to pixel tensors before and after parallel decoding, for
  encoding and gpu_check.
- round_overhead: FedCLIP's seconds per round against that floor's, in simulation (4 to 1000 clients, sampled or
  not) and deployment, and their ratio.
- sweep: the leave-one-domain-out sweep: one real `flwr run` per method, held-out domain and seed, then the table.
- sweep_report: the sweep's tables and plots, read back from its run folders.
- synthetic: helper, the stand-ins encoding and gpu_check run on: a PACS-shaped synthetic folder, a CLIP of
  ViT-B/32's sizes with random weights.
"""
