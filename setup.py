from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="timemachine",
    version="0.1.0",
    description="A distributed, fault-tolerant scheduler database on Twisted",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # twisted/plugins has no __init__.py on purpose: Twisted finds plugins there, in a
    # twisted/plugins directory of any sys.path entry. Naming the root package dir lets
    # `pip install -e .` put the checkout itself on sys.path (a static .pth) instead of
    # an import hook that would hide the plugin from Twisted.
    package_dir={"": "."},
    packages=[*find_packages(include=["timemachine", "timemachine.*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["timemachine_plugin.py"]},
    # Offline commands (repair); the node itself runs as `twistd timemachine`.
    entry_points={"console_scripts": ["timemachine = timemachine.cli:main"]},
    install_requires=[
        "twisted[tls]>=23.10",
        "klein>=23.5",
        "treq>=23.11",
        "txredisapi>=1.4.10",
        "protobuf>=7.35.1",  # the generated module checks the runtime
        "sqlalchemy>=2.0",
        "zope.interface>=6.0",
        "xxhash>=3.4",
        "crc32c>=2.4",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "grpcio-tools>=1.62",
            "ruff>=0.6",
        ],
    },
)
