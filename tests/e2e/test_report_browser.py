"""The report in a real browser: headless Chromium opens the page that `paratrain report` wrote
from recorded runs (tests/data/demo-compare: the light files of a `make demo` comparison), every
image has loaded (natural width > 0), the console logged no error, and the screenshot of the
whole page is not blank. The same check finds a broken image when one is planted.

Debian's `chromium` and `chromium-driver` are installed here with apt-get when they are missing
and this runs as root; otherwise the test is skipped and says why. selenium (a test extra) drives
the browser through the chromedriver Debian ships, so nothing is downloaded at test time."""
import shutil

from tests.helpers import ROOT, apt_install, cli

RECORDED = ROOT / "tests" / "data" / "demo-compare"
IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"


def test_the_report_opens_in_headless_chromium_with_every_image_and_no_console_error(tmp_path):
    page = tmp_path / "report.html"
    out = cli(["report", str(RECORDED), "--out", str(page)], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    apt_install(["chromium", "chromium-driver"], ["chromium", "chromedriver"])
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.as_uri())  # returns once the page and its images have loaded
        images = driver.execute_script(IMAGES)
        captions = driver.execute_script("return document.querySelectorAll('figcaption').length")
        assert len(images) == captions >= 9, (images, captions)
        assert all(done and width > 0 for done, width in images), images
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))

        # The check can fail: one image's data cut short is caught.
        broken = tmp_path / "broken.html"
        html = page.read_text()
        at = html.index("data:image/png;base64,") + len("data:image/png;base64,")
        broken.write_text(html[:at] + html[at + 40:])
        driver.get(broken.as_uri())
        bad = driver.execute_script(IMAGES)
        assert sum(width == 0 for _, width in bad) == 1, bad
    finally:
        driver.quit()

    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 0.9 * min(height, 16000) and pixels.shape[1] >= 1200, pixels.shape
    assert pixels[..., :3].std() > 0.05  # plots drawn, not a blank page
