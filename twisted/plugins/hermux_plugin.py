from twisted.application.service import ServiceMaker

hermux = ServiceMaker(
    "hermux",
    "hermux.tap",
    "A reverse proxy that spreads OpenRouter requests over several API keys.",
    "hermux",
)
