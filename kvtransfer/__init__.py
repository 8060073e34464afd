"""pdserve.kvtransfer: KV page transfer backends (fake, zmq, nccl). Arrives with issue 4."""
