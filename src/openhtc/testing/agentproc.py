"""A real ``htc agent`` process for tests and benchmarks: started in its own session, stopped by
its pid (two SIGTERMs: drain, then kill what still runs; SIGKILL to its group only if it hangs)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class AgentProcess:
    def __init__(
        self,
        htc: list[str],
        server_url: str,
        token: str,
        work_dir: Path,
        *,
        runtime: str = "process",
        vcpus: int = 2,
        args: tuple[str, ...] = (),
    ) -> None:
        """``htc``: the command that runs ``htc`` (testing.server.htc_command, bench's htc_binary)."""
        self.work_dir = work_dir
        self.log_path = work_dir / "agent.log"
        work_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
        env.update({"OPENHTC_AGENT_TOKEN": token, "OPENHTC_AGENT_SERVER": server_url})
        cmd = [*htc, "agent", "--runtime", runtime, "--vcpus", str(vcpus), "--work-dir", str(work_dir), *args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.send_signal(signal.SIGTERM)  # the second kills what still runs
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
