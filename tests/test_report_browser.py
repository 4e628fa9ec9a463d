"""The HTML report in a real browser: headless Chromium (Debian's `chromium` package) loads it with every image
decoded and no script or resource error. Skipped, with the reason, where Chromium is not installed (`.ci/run`
installs it where apt-get works)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cpt.report import write_report

RUNS = Path(__file__).parent / "data" / "runs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# counts failed resources and script errors from the first byte on, then, once loaded, how many images decoded
PROBE = """<script>
var cptErrors = [];
window.addEventListener('error', function (e) { cptErrors.push(String(e.message || (e.target && e.target.src) || e)); }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = 'CPT-PROBE images ' + ok + '/' + imgs.length + ' errors ' + cptErrors.length + ' ' + cptErrors.join(' | ');
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); the browser check is skipped")
def test_the_report_renders_in_headless_chromium_with_every_image_decoded(tmp_path):
    files = write_report([RUNS / "sequential", RUNS / "replay", RUNS / "joint"], tmp_path / "report")
    html = files["report.html"]
    probe = html.with_name("probe.html")
    text = html.read_text(encoding="utf-8")
    assert "<head>" in text
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = _chromium("--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", "--dump-dom", probe.as_uri())
    m = re.search(r"<title>CPT-PROBE images (\d+)/(\d+) errors (\d+)(.*?)</title>", proc.stdout, re.S)
    assert m, (proc.returncode, proc.stderr[-2000:])
    ok, total, errors = int(m.group(1)), int(m.group(2)), int(m.group(3))
    assert total >= 3 and ok == total, f"{ok} of {total} images decoded"
    assert errors == 0, m.group(4)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "error" in line.lower())]
    assert not console, console
    # a screenshot of the first screen, for a person to look at (kept next to the report)
    shot = tmp_path / "report" / "first-screen.png"
    _chromium("--window-size=1280,900", f"--screenshot={shot}", html.as_uri())
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
