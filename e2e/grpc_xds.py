#!/usr/bin/env python3
"""A real gRPC xDS client and a plain gRPC server for the e2e tests (PyPI grpcio).

  grpc_xds.py serve NAME            serve helloworld.Greeter/SayHello on 127.0.0.1, print the port
  grpc_xds.py call TARGET SECONDS   call SayHello on TARGET (e.g. xds:///grpc.example.com) until it
                                    answers; GRPC_XDS_BOOTSTRAP names the bootstrap file
"""
import sys
import time
from concurrent import futures

import grpc


def serve(name):
    reply = f"hello from {name}".encode()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: reply)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("helloworld.Greeter", {"SayHello": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(target, seconds):
    end, last = time.time() + seconds, None
    while time.time() < end:
        try:
            with grpc.insecure_channel(target) as channel:
                print(channel.unary_unary("/helloworld.Greeter/SayHello")(b"hi", timeout=3).decode(), flush=True)
                return 0
        except grpc.RpcError as e:
            last = e
            time.sleep(0.3)
    print(f"no answer from {target}: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(call(sys.argv[2], float(sys.argv[3])))
