from setuptools import find_packages, setup

setup(
    name="hermux",
    version="0.1.0",
    description="A reverse proxy that spreads OpenRouter requests over several API keys.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # package_dir makes "pip install -e ." put the checkout on sys.path, where
    # twistd finds twisted/plugins/hermux_plugin.py.
    package_dir={"": "."},
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"])
    + ["twisted.plugins"],
    install_requires=[
        # >=25.5: HermuxSite passes parsePOSTFormSubmission.  hermux uses
        # private names of Twisted (all in hermux/_twistedinternals.py), which
        # may change in any release: the suite ran on 26.10, so the bound is
        # the next major (calendar) version; raise it once
        # tests/test_twistedinternals.py and the suite pass on that release.
        "Twisted[tls]>=25.5,<27",
        "treq>=24.9",
        "service-identity>=24.1",
        "pyOpenSSL>=24.0",
        "attrs>=23.1",
        "prometheus-client>=0.20",
        # --redis: redis-py, maintained by Redis itself, with timeouts, TLS,
        # UNIX sockets and scripts; hermux.shared runs it in a thread of its
        # own, off the reactor.
        "redis>=5.0",
    ],
    extras_require={
        # selenium drives the system's Chromium (Debian's chromium and
        # chromium-driver) in the dashboard's browser tests; it downloads
        # nothing there (SE_OFFLINE).
        "test": ["hypothesis>=6.100", "openai>=1.30", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["hermux = hermux.cli:main"]},
    # The dashboard's page, script and style (hermux/dashboard.py serves them).
    package_data={"hermux": ["dashboard/*.html", "dashboard/*.js", "dashboard/*.css"]},
    include_package_data=True,
    zip_safe=False,
)
