"""The chat page of `attractors serve` in headless Chromium through WebDriver: choose a
policy and a small budget, type messages, see each streamed reply and, after enough turns,
the cache view with greyed evicted tokens. Usage: serve_page.py BASE_URL POLICY BUDGET TURNS."""
import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

url, policy, budget, turns = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(url + "/")
    Select(driver.find_element(By.ID, "policy")).select_by_visible_text(policy)
    b = driver.find_element(By.ID, "budget")
    b.clear()
    b.send_keys(str(budget))
    wait = WebDriverWait(driver, 60)
    for t in range(turns):
        box = driver.find_element(By.ID, "text")
        box.send_keys(f"the hen and the den of the red sheds, message {t}")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == t + 1 or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
    replies = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")]
    assert len(replies) == turns and all(r.startswith("assistant: ") for r in replies), replies
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cache span"))
    kept = driver.find_elements(By.CSS_SELECTOR, "#cache span.kept")
    evicted = driver.find_elements(By.CSS_SELECTOR, "#cache span.evicted")
    assert 0 < len(kept) <= budget, (len(kept), budget)
    assert evicted, "no evicted token shown after the cache overflowed"
    grey = evicted[0].value_of_css_property("color")
    shade = kept[-1].value_of_css_property("background-color")
    info = driver.find_element(By.ID, "kvinfo").text
    assert f"of {budget} cells" in info, info
    print(json.dumps({"replies": len(replies), "kept": len(kept), "evicted": len(evicted), "evicted_color": grey, "kept_background": shade, "info": info}))
finally:
    driver.quit()
