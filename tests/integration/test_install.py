"""A newcomer's ``pip install -e .`` gives a working ``twistd timemachine``.

An editable install must leave the checkout's ``twisted/plugins`` where Twisted looks
for plugins (a ``twisted/plugins`` directory of some ``sys.path`` entry). setuptools'
default import hook for flat layouts hides it ("Unknown command: timemachine"), so this
installs the checkout into a fresh virtualenv, as README tells a newcomer to, and asks
that environment's ``twistd`` for the plugin's options from outside the checkout.
"""

import os
import subprocess
import sys
import venv

from twisted.trial import unittest

from tests.support import REPO


class EditableInstallTests(unittest.TestCase):
    timeout = 600

    def test_editable_install_has_the_twistd_plugin(self):
        env_dir = os.path.abspath(self.mktemp())
        venv.EnvBuilder(with_pip=False).create(env_dir)
        python = os.path.join(env_dir, "bin", "python")
        # This interpreter's pip installs into the new environment: no network fetch of
        # pip itself, and the new environment sees nothing of this one.
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "-q", "-e", REPO],
            check=True, capture_output=True, timeout=540,
        )
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        result = subprocess.run(
            [os.path.join(env_dir, "bin", "twistd"), "timemachine", "--help"],
            cwd=elsewhere, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("--node-id", result.stdout)
