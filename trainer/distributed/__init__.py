"""Training on several GPUs and machines with torch.distributed: the loop's share of the work
(data_parallel.py), the job folder the controller and the workers share (job.py), starting and watching
torchrun from the controller (launcher.py), and a worker's side of it (worker.py)."""
