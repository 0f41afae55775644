"""The generated protobuf module matches proto/timemachine.proto."""

import os
import tempfile

from google.protobuf import descriptor_pb2
from twisted.trial import unittest

from timemachine._pb import generate, timemachine_pb2


def _without_json_names(file_proto):
    """protoc's --python_out drops json_name; compare the rest."""
    messages = list(file_proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return file_proto


class GeneratedModuleTests(unittest.TestCase):
    def test_generated_module_is_current(self):
        from grpc_tools import protoc

        with tempfile.TemporaryDirectory() as out:
            descriptor_file = os.path.join(out, "timemachine.desc")
            status = protoc.main(
                [
                    "protoc",
                    f"-I{generate.PROTO_DIR}",
                    f"--descriptor_set_out={descriptor_file}",
                    str(generate.PROTO_DIR / generate.PROTO_NAME),
                ]
            )
            self.assertEqual(status, 0)
            with open(descriptor_file, "rb") as f:
                fresh = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file[0]
        shipped = descriptor_pb2.FileDescriptorProto.FromString(
            timemachine_pb2.DESCRIPTOR.serialized_pb
        )
        self.assertEqual(
            _without_json_names(shipped),
            _without_json_names(fresh),
            "timemachine/_pb/timemachine_pb2.py is out of date with proto/timemachine.proto: "
            "run `python -m timemachine._pb.generate`",
        )
