"""
The official OpenAI Python SDK pointed at hermux, over loopback sockets,
against the fake OpenRouter.

The SDK blocks, so each call runs in a thread with its own client, closed
in that thread when the call is over: the reactor keeps running, and no
connection outlives the test.
"""

from __future__ import annotations

import openai
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hermux.testing import FAKE_ANSWER, FAKE_MODEL
from tests.harness import ACCESS_TOKEN, KEYS, Proxy

KEY_NAMES = {key.name for key in KEYS}
MESSAGES = [{"role": "user", "content": "Say something."}]


def _withClient(baseURL: str, apiKey: str, work):
    """
    Run C{work(client)} with a new SDK client for C{baseURL}, and close the
    client whatever happens.
    """
    client = openai.OpenAI(base_url=baseURL, api_key=apiKey, max_retries=0)
    try:
        return work(client)
    finally:
        client.close()


class SDKTests(TestCase):
    """
    What a program written with the OpenAI SDK sees through hermux.
    """

    def setUp(self):
        self.proxy = Proxy(self)

    def call(self, work, path: str = "/v1", apiKey: str = ACCESS_TOKEN):
        """
        Run C{work(client)} in a thread with a client for hermux's C{path};
        the Deferred fires with what it returns.
        """
        return deferToThread(_withClient, self.proxy.url(path), apiKey, work)

    async def test_chatCompletionViaV1(self):
        """
        A chat completion with base URL .../v1 returns the fake answer.
        """
        completion = await self.call(
            lambda client: client.chat.completions.create(
                model="test/model", messages=MESSAGES
            ),
            "/v1",
        )
        self.assertEqual(completion.choices[0].message.content, FAKE_ANSWER)
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.model, "test/model")
        [received] = self.proxy.fake.received
        self.assertEqual(received.uri, b"/api/v1/chat/completions")

    async def test_chatCompletionViaApiV1(self):
        """
        A chat completion with OpenRouter's own base URL .../api/v1 returns
        the fake answer.
        """
        completion = await self.call(
            lambda client: client.chat.completions.create(
                model="test/model", messages=MESSAGES
            ),
            "/api/v1",
        )
        self.assertEqual(completion.choices[0].message.content, FAKE_ANSWER)
        self.assertEqual(completion.usage.completion_tokens, len(FAKE_ANSWER.split()))
        [received] = self.proxy.fake.received
        self.assertEqual(received.uri, b"/api/v1/chat/completions")

    async def test_streamingChatCompletion(self):
        """
        A streamed chat completion's deltas add up to the fake answer, and
        the stream ends with finish_reason "stop".
        """

        def stream(client):
            deltas = []
            reasons = []
            for chunk in client.chat.completions.create(
                model="test/model", messages=MESSAGES, stream=True
            ):
                for choice in chunk.choices:
                    if choice.delta.content is not None:
                        deltas.append(choice.delta.content)
                    if choice.finish_reason is not None:
                        reasons.append(choice.finish_reason)
            return deltas, reasons

        deltas, reasons = await self.call(stream)
        self.assertEqual("".join(deltas), FAKE_ANSWER)
        self.assertEqual(len(deltas), len(FAKE_ANSWER.split()))
        # The last chunk, with the usage, repeats the finish reason, as
        # OpenRouter's do.
        self.assertEqual(reasons, ["stop", "stop"])

    async def test_rawResponseNamesTheKey(self):
        """
        The raw response carries X-Token-Name, the name of the key that
        served the request, and parses to the fake answer.
        """

        def raw(client):
            response = client.chat.completions.with_raw_response.create(
                model="test/model", messages=MESSAGES
            )
            return response.status_code, response.headers.get("X-Token-Name"), response.parse()

        status, name, completion = await self.call(raw)
        self.assertEqual(status, 200)
        self.assertIn(name, KEY_NAMES)
        self.assertEqual(completion.choices[0].message.content, FAKE_ANSWER)

    async def test_wrongAccessTokenIsAuthenticationError(self):
        """
        A client with a wrong access token gets openai.AuthenticationError,
        status 401, and nothing reaches the upstream.
        """

        def refused(client):
            try:
                client.chat.completions.create(model="test/model", messages=MESSAGES)
            except openai.AuthenticationError as e:
                return e
            return None

        error = await self.call(refused, apiKey="not-the-access-token")
        self.assertIsInstance(error, openai.AuthenticationError)
        self.assertEqual(error.status_code, 401)
        self.assertEqual(self.proxy.fake.received, [])

    async def test_modelsList(self):
        """
        models.list() returns the fake model.
        """
        page = await self.call(lambda client: client.models.list())
        self.assertEqual([model.id for model in page.data], [FAKE_MODEL])
