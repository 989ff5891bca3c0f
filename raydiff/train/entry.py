"""The function each Ray Train worker runs, in a module that imports nothing heavy.

The Train controller unpickles the training function (and so imports its module) before it starts any worker; the
loop's module pulls in torch, DeepSpeed, diffusers and transformers, seconds of CPU on the start-up path of every run
and every worker-group restart. Workers import the loop when they call this.
"""


def train_loop_per_worker(loop_config: dict) -> None:
    from raydiff.train.loop import train_loop_per_worker as run

    run(loop_config)
