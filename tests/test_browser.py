"""
The dashboard in a real browser: headless Chromium (Debian's C{chromium}
and C{chromium-driver}) driven by Selenium, against hermux on the fake
OpenRouter over loopback, after a known mix of requests.

hermux runs on trial's reactor; Selenium's calls block, so they run in
threads (L{deferToThread}).  A failing test saves the page as
C{dashboard-<test>.png} and C{.html} in trial's temporary directory, next
to C{test.log}.  One test also writes C{dashboard.png} there, and to the
path in C{HERMUX_SCREENSHOT} if it is set (the README's screenshot).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hermux.config import ClientEntry, Role
from hermux.ledger import dayText
from hermux.keypool import dayOf
from tests.harness import ACCESS_TOKEN, CHAT, KEYS, Proxy, chatBody, waitUntil
from tests.programs import requireProgram

ALPHA, BETA, _ = KEYS
BOT_TOKEN = "hx-browser-ci-bot-token-2b7d41"
TEAM_TOKEN = "hx-browser-team-token-9e0c5a"
OPS_TOKEN = "hx-browser-ops-token-6a3f18"
BOT = ClientEntry(name="ci-bot", token=BOT_TOKEN, dailyRequests=50, perMinute=30)
TEAM = ClientEntry(name="team", token=TEAM_TOKEN, keys=("beta",))
OPS = ClientEntry(name="ops", token=OPS_TOKEN, role=Role.ADMIN)
# A model id a client chose, as the page must show it: as text.
HOSTILE_MODEL = "<img src=x onerror=window.__xss=1>"
# Where the chart and the tables below it are in the window.
WHERE = (
    "return ['history', 'breakdown'].map((id) =>"
    " Math.round(document.getElementById(id).getBoundingClientRect().top))"
)
FREE_MODEL = "meta-llama/llama-3.3-70b-instruct:free"
WAIT = 10  # seconds a browser condition may take


def startBrowser(chromium: str, chromedriver: str):
    """
    A headless Chromium, found on the PATH, with its console log kept.
    """
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def savesPage(test):
    """
    On failure, save the page's screenshot and HTML in the test's working
    directory (trial's temporary directory) before the failure goes on.
    """

    @functools.wraps(test)
    async def wrapper(self):
        try:
            await test(self)
        except BaseException:
            name = f"dashboard-{self._testMethodName}"
            try:
                self.driver.save_screenshot(f"{name}.png")
                with open(f"{name}.html", "w", encoding="utf-8") as f:
                    f.write(self.driver.page_source)
            except Exception:
                pass  # the browser itself is what failed
            raise

    return wrapper


class DashboardTests(TestCase):
    """
    The dashboard after requests of two user clients, ci-bot and team
    (whose only key, beta, is exhausted by a fake 429, and which asked for
    a model with an HTML-looking id), and of allow.txt's admin.
    """

    timeout = 60

    async def setUp(self):
        chromium = requireProgram(self, "chromium", "chromium")
        chromedriver = requireProgram(self, "chromedriver", "chromium-driver")
        self.proxy = Proxy(self, keys=(ALPHA, BETA), clients=(BOT, TEAM, OPS))
        await self.requests()
        self.driver = await deferToThread(startBrowser, chromium, chromedriver)
        self.addCleanup(deferToThread, self.driver.quit)

    async def chat(self, token, model="test/model"):
        response = await self.proxy.request(
            "POST", CHAT, token=token, headers={"Content-Type": "application/json"},
            data=chatBody(model=model),
        )
        await response.content()
        return response

    async def requests(self):
        for _ in range(3):
            self.assertEqual((await self.chat(BOT_TOKEN)).code, 200)
        for _ in range(2):
            self.assertEqual((await self.chat(TEAM_TOKEN, HOSTILE_MODEL)).code, 200)
        # team's only key meets OpenRouter's daily limit of free models (a
        # 429), then runs out of credits (a 402): it is exhausted.
        self.proxy.fake.platformLimitNext(key=BETA.token)
        self.assertEqual((await self.chat(TEAM_TOKEN, FREE_MODEL)).code, 429)
        self.proxy.fake.paymentRequiredNext(key=BETA.token)
        self.assertEqual((await self.chat(TEAM_TOKEN)).code, 429)  # no key left for team
        for _ in range(2):
            self.assertEqual((await self.chat(ACCESS_TOKEN, FREE_MODEL)).code, 200)
        states = {status.name: status.state.value for status in self.proxy.pool.statuses()}
        self.assertEqual(states, {"alpha": "ready", "beta": "exhausted"})

    async def json(self, path, token=ACCESS_TOKEN):
        response = await self.proxy.request("GET", path, token=token)
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())

    def browse(self, function, *args):
        """
        Run C{function(driver, *args)} in a thread: Selenium blocks.
        """
        return deferToThread(function, self.driver, *args)

    # What the browser does, in its thread.

    def signIn(self, driver, token, expect="session"):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(self.proxy.url("/hermux"))  # redirected to /hermux/
        field = WebDriverWait(driver, WAIT).until(EC.visibility_of_element_located((By.ID, "token")))
        field.send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        if expect == "session":
            WebDriverWait(driver, WAIT).until(
                lambda d: d.find_element(By.ID, "updated").text.startswith("updated")
            )

    def script(self, driver, source, *args):
        return driver.execute_script(source, *args)

    def problems(self, driver):
        """
        The console's warnings and errors since last asked.
        """
        return [e["message"] for e in driver.get_log("browser") if e["level"] in ("WARNING", "SEVERE")]

    def requestedURLs(self, driver):
        return driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name)"
            ".concat([location.href])"
        )

    def assertOnlyHermux(self, urls):
        """
        The page asked hermux only, and never put a token in a URL.
        """
        origin = self.proxy.url("/")
        for url in urls:
            self.assertTrue(url.startswith(origin), url)
            for token in (ACCESS_TOKEN, BOT_TOKEN, TEAM_TOKEN, OPS_TOKEN):
                self.assertNotIn(token, url)

    # The tests.

    @savesPage
    async def test_admin(self):
        """
        An admin sees the health line, the keys table as /hermux/keys says,
        a chart with one series per key, switchable to tokens, and the
        tables per client and per model, where the HTML-looking model id is
        text and nothing it carries ran; the tables sort; the console is
        clean; the page asked nothing but hermux.
        """
        await self.browse(self.signIn, ACCESS_TOKEN)
        keys = (await self.json("/hermux/keys"))["keys"]
        shown = await self.browse(
            self.script,
            """
            const row = (tr) => [...tr.cells].map((c) => c.textContent);
            return {
              health: document.getElementById('health').textContent,
              keys: [...document.querySelectorAll('#keys-table tbody tr')].map((tr) => ({
                cells: row(tr),
                badge: tr.querySelector('.badge').className,
                meter: tr.cells[2].querySelector('meter').hidden ? null
                  : [tr.cells[2].querySelector('meter').value, tr.cells[2].querySelector('meter').max],
                time: tr.querySelector('time') && [tr.querySelector('time').getAttribute('datetime'),
                                                   tr.querySelector('time').title],
              })),
              series: [...document.querySelectorAll('#chart g.series')].map((g) => g.dataset.key),
              legend: [...document.querySelectorAll('#legend li')].map((li) => li.textContent),
              clients: [...document.querySelectorAll('#clients-table tbody tr')].map(row),
              models: [...document.querySelectorAll('#models-table tbody tr')].map(row),
              modelCells: [...document.querySelectorAll('#models-table tbody th')].map(
                (th) => th.childElementCount),
              images: document.images.length,
              xss: window.__xss === undefined ? null : String(window.__xss),
              userSection: document.getElementById('me').hidden,
            };
            """,
        )
        self.assertRegex(shown["health"], r"^ok · version \S+ · up \d+ s · 1 of 2 keys ready$")
        self.assertEqual(len(shown["keys"]), len(keys))
        for key, row in zip(keys, shown["keys"]):
            self.assertEqual(row["cells"][0], key["name"])
            self.assertEqual(row["cells"][1], key["state"])
            self.assertEqual(row["badge"], f"badge state-{key['state']}")
            limit = key["daily_limit"]
            free = str(key["free_requests_today"])
            self.assertEqual(row["cells"][2], free if limit is None else f"{free} / {limit:,}")
            self.assertEqual(row["meter"], None if limit is None else [key["free_requests_today"], limit])
            self.assertEqual(row["cells"][4], str(key["rate_limited_today"]))
            self.assertEqual(row["cells"][5], str(key["errors_today"]))
            for reason in (key["reason"], key["free_requests_reason"], key["paid_requests_reason"]):
                self.assertIn(reason or "", row["cells"][7])
            if key["reason"] is not None:
                self.assertEqual(row["cells"][7], key["reason"])
            if key["usable_again_at"] is None:
                self.assertIsNone(row["time"])
            else:
                self.assertEqual(row["time"][0], key["usable_again_at"])
                self.assertTrue(row["time"][1].endswith(" UTC"), row["time"])
        beta = keys[[key["name"] for key in keys].index("beta")]
        self.assertEqual(beta["state"], "exhausted")
        self.assertIsNotNone(beta["usable_again_at"])
        self.assertGreater(beta["rate_limited_today"], 0)

        today = dayText(dayOf(time.time()))
        history = await self.json(f"/hermux/usage?from={dayText(dayOf(time.time()) - 29)}&to={today}")
        self.assertEqual(shown["series"], sorted({row["key"] for row in history["rows"]}))
        self.assertEqual(shown["series"], ["alpha", "beta"])
        self.assertEqual(shown["legend"], shown["series"])

        byModel = await self.json("/hermux/usage?group_by=model")
        self.assertEqual(
            sorted(row[0] for row in shown["models"]), sorted(row["model"] for row in byModel["rows"])
        )
        self.assertIn(HOSTILE_MODEL, [row[0] for row in shown["models"]])
        self.assertEqual(set(shown["modelCells"]), {0})
        self.assertEqual((shown["images"], shown["xss"]), (0, None))
        byClient = await self.json("/hermux/usage?group_by=client")
        expected = sorted(((row["client"], row["requests"]) for row in byClient["rows"]), key=lambda r: -r[1])
        self.assertEqual([(row[0], int(row[1])) for row in shown["clients"]], expected)
        self.assertTrue(shown["userSection"])

        def screenshot(driver):
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": 1160, "deviceScaleFactor": 1, "mobile": False},
            )
            driver.save_screenshot("dashboard.png")
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        await self.browse(screenshot)
        if os.environ.get("HERMUX_SCREENSHOT"):
            shutil.copyfile("dashboard.png", os.environ["HERMUX_SCREENSHOT"])

        def switchAndSort(driver):
            from selenium.webdriver.common.by import By
            from selenium.webdriver.common.keys import Keys

            # Keyboard only: tab to the radio, arrow to "tokens".
            radio = driver.find_element(By.CSS_SELECTOR, 'input[name="metric"][value="requests"]')
            radio.send_keys(Keys.ARROW_RIGHT)
            tokens = driver.execute_script(
                "return [document.querySelector('input[name=metric]:checked').value,"
                " document.getElementById('chart-title').textContent,"
                " [...document.querySelectorAll('#chart rect title')].map((t) => t.textContent)]"
            )
            header = driver.find_element(By.CSS_SELECTOR, '#clients-table th[data-column="requests"] button')
            header.send_keys(Keys.ENTER)
            return tokens, driver.execute_script(
                "return [document.querySelector('#clients-table th[data-column=requests]')"
                ".getAttribute('aria-sort'), [...document.querySelectorAll("
                "'#clients-table tbody tr')].map((tr) => Number(tr.cells[1].textContent))]"
            )

        (metric, title, rectTitles), (sort, requests) = await self.browse(switchAndSort)
        self.assertEqual(metric, "tokens")
        self.assertIn("tokens per day", title)
        self.assertTrue(rectTitles)
        self.assertTrue(all(t.endswith(" tokens") for t in rectTitles), rectTitles)
        self.assertEqual((sort, requests), ("ascending", sorted(requests)))

        self.assertOnlyHermux(await self.browse(self.requestedURLs))
        self.assertEqual(await self.browse(self.script, "return document.cookie"), "")
        self.assertEqual(await self.browse(self.problems), [])

    @savesPage
    async def test_csv(self):
        """
        Each table downloads as CSV, with the rows it shows, the
        HTML-looking model id as it is.
        """
        downloads = os.path.abspath(self.mktemp())
        os.mkdir(downloads)

        def download(driver):
            from selenium.webdriver.common.by import By

            driver.execute_cdp_cmd(
                "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads}
            )
            for button in driver.find_elements(By.CSS_SELECTOR, "button.csv"):
                button.click()

        await self.browse(self.signIn, ACCESS_TOKEN)
        await self.browse(download)
        today = dayText(dayOf(time.time()))
        week = dayText(dayOf(time.time()) - 6)
        paths = [os.path.join(downloads, f"hermux-{name}-{week}-{today}.csv") for name in ("clients", "models")]

        def downloaded():
            # Chromium may make the file before it writes it.
            return not [n for n in os.listdir(downloads) if n.endswith(".crdownload")] and all(
                os.path.exists(path) and Path(path).read_text().count("\n") > 1 for path in paths
            )

        await waitUntil(downloaded, timeout=WAIT)
        tables = {}
        for name in ("clients", "models"):
            with open(os.path.join(downloads, f"hermux-{name}-{week}-{today}.csv"), newline="") as f:
                tables[name] = list(csv.DictReader(f))
        byModel = (await self.json(f"/hermux/usage?group_by=model&from={week}"))["rows"]
        self.assertEqual(
            sorted((row["model"], int(row["requests"])) for row in tables["models"]),
            sorted((row["model"], row["requests"]) for row in byModel),
        )
        self.assertIn(HOSTILE_MODEL, [row["model"] for row in tables["models"]])
        byClient = (await self.json(f"/hermux/usage?group_by=client&from={week}"))["rows"]
        self.assertEqual(
            sorted((row["client"], float(row["cost"])) for row in tables["clients"]),
            sorted((row["client"], row["cost"]) for row in byClient),
        )
        self.assertEqual(await self.browse(self.problems), [])

    @savesPage
    async def test_user(self):
        """
        A user token sees its own limits, what remains of them today and
        its own usage chart, and nothing of other clients or the keys.
        """
        await self.browse(self.signIn, BOT_TOKEN)
        shown = await self.browse(
            self.script,
            """
            return {
              hidden: ['me', 'keys', 'history', 'breakdown'].map((id) => document.getElementById(id).hidden),
              me: [...document.querySelectorAll('#me-table tbody tr')].map(
                (tr) => [...tr.cells].map((c) => c.textContent)),
              rows: document.querySelectorAll('#keys-table tbody tr, .usage tbody tr').length,
              who: document.getElementById('who').textContent,
              bars: [...document.querySelectorAll('#chart rect title')].map((t) => t.textContent),
            };
            """,
        )
        self.assertEqual(shown["hidden"], [False, True, False, True])
        self.assertEqual(shown["who"], "ci-bot (user)")
        self.assertEqual(shown["me"][0], ["daily requests", "50", "3", "47"])
        self.assertEqual(shown["me"][2], ["requests per minute", "30", "", ""])
        self.assertEqual(shown["rows"], 0)
        requests = sum(int(re.search(r": (\d+) requests$", bar).group(1)) for bar in shown["bars"])
        self.assertEqual(requests, 3)
        urls = await self.browse(self.requestedURLs)
        self.assertOnlyHermux(urls)
        self.assertFalse([url for url in urls if "/hermux/keys" in url or "group_by=client" in url])
        self.assertEqual(await self.browse(self.problems), [])

    @savesPage
    async def test_wrongToken(self):
        """
        A wrong token shows hermux's 401 message and is not kept.
        """
        await self.browse(self.signIn, "not-a-token", None)

        def refused(driver):
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, WAIT).until(
                lambda d: d.find_element("id", "sign-in-error").text
            )
            return driver.execute_script(
                "return [document.getElementById('sign-in-error').textContent, sessionStorage.length,"
                " document.getElementById('session').hidden]"
            )

        self.assertEqual(await self.browse(refused), ["missing or unknown access token", 0, True])
        problems = await self.browse(self.problems)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("401", problems[0])

    @savesPage
    async def test_signOut(self):
        """
        Signing out forgets the token and what was shown; a reload asks for
        a token again.
        """
        await self.browse(self.signIn, OPS_TOKEN)
        self.assertEqual(
            await self.browse(self.script, "return sessionStorage.getItem('hermux.token')"), OPS_TOKEN
        )

        def signOut(driver):
            driver.find_element("id", "sign-out").click()
            after = driver.execute_script(
                "return [sessionStorage.length, document.querySelectorAll('tbody tr').length,"
                " document.querySelectorAll('#chart g.series').length,"
                " document.getElementById('sign-in').hidden, document.getElementById('keys').hidden]"
            )
            driver.refresh()
            return after, driver.execute_script(
                "return [sessionStorage.length, document.getElementById('sign-in').hidden]"
            )

        self.assertEqual(await self.browse(signOut), ([0, 0, 0, False, True], [0, False]))
        self.assertEqual(await self.browse(self.problems), [])

    @savesPage
    async def test_phoneAndDarkMode(self):
        """
        On a 375 px wide screen nothing is wider than the screen (wide
        tables scroll in their own box); a dark colour scheme darkens the
        page.
        """
        await self.browse(self.signIn, ACCESS_TOKEN)

        def look(driver):
            background = "return getComputedStyle(document.body).backgroundColor"
            light = driver.execute_script(background)
            driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia",
                {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
            )
            dark = driver.execute_script(background)
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True},
            )
            widths = driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]"
            )
            return light, dark, widths

        light, dark, (scrollWidth, innerWidth) = await self.browse(look)
        self.assertNotEqual(light, dark)
        self.assertEqual(sum(map(int, re.findall(r"\d+", dark)[:3])) < 3 * 64, True, dark)
        self.assertEqual(innerWidth, 375)
        self.assertLessEqual(scrollWidth, innerWidth)

    @savesPage
    async def test_refreshAndUnreachable(self):
        """
        Every 10 seconds the page shows new counts in the rows it has (no
        row rebuilt, the scroll position kept) and says how long ago it
        was updated; when hermux cannot be reached it says so and keeps
        the last data.
        """
        await self.browse(self.signIn, ACCESS_TOKEN)

        def before(driver):
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1000, "height": 400, "deviceScaleFactor": 1, "mobile": False},
            )
            driver.execute_script("window.scrollTo(0, 300)")
            return driver.find_element("css selector", '#clients-table tr[data-key="ci-bot"]'), driver.execute_script(WHERE)

        row, where = await self.browse(before)
        for _ in range(2):
            self.assertEqual((await self.chat(BOT_TOKEN)).code, 200)

        def refreshed(driver):
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 15, poll_frequency=0.25).until(lambda d: row.find_elements(
                "css selector", "td")[0].text == "5")
            return driver.execute_script(WHERE), driver.find_element("id", "updated").text

        whereAfter, updated = await self.browse(refreshed)
        # What was in view stays where it was (the browser's scroll
        # anchoring absorbs a header that wraps differently).
        for top, topAfter in zip(where, whereAfter):
            self.assertAlmostEqual(topAfter, top, delta=2)
        self.assertRegex(updated, r"^updated \d s ago$")

        await self.proxy.port.stopListening()
        for channel in list(self.proxy.site.channels):
            channel.transport.abortConnection()

        def unreachable(driver):
            from selenium.webdriver.support.ui import WebDriverWait

            driver.find_element("id", "refresh").click()
            WebDriverWait(driver, WAIT).until(lambda d: d.find_element("id", "unreachable").is_displayed())
            return driver.execute_script(
                "return [document.getElementById('unreachable').textContent,"
                " document.querySelector('#clients-table tr[data-key=\"ci-bot\"]').cells[1].textContent]"
            )

        banner, requests = await self.browse(unreachable)
        self.assertEqual(banner, "hermux is unreachable; showing the last data it sent.")
        self.assertEqual(requests, "5")
        problems = await self.browse(self.problems)
        self.assertTrue(problems)
        for problem in problems:
            self.assertIn("ERR_CONNECTION_REFUSED", problem)
