"""The arguments' value types (argparse `type=`): a bad value is one clear error line."""

from __future__ import annotations

import argparse
import ipaddress
import os

from agent import config
from agent.errors import UsageError
from agent.model import UpstreamSpec, parse_pin


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 and <= 3600 seconds")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 60:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 and <= 60 minutes")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    return int(text)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _pin(text: str) -> str:
    try:
        return parse_pin(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _readable_file(text: str) -> str:
    if not os.access(text, os.R_OK) or not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"cannot read file {text!r}")
    return text


def _upstream(text: str) -> UpstreamSpec:
    try:
        return UpstreamSpec.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str) -> tuple[str, int]:
    try:
        return config.parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The command modules use these names. The functions keep their underscore names because
# argparse prints a type's __name__ when it raises ValueError instead of ArgumentTypeError
# ("invalid _port value: '²'": str.isdigit() is true for '²', int() is not), and moving
# them here changed no output.
positive = _positive
minutes = _minutes
port = _port
ip = _ip
pin = _pin
readable_file = _readable_file
upstream = _upstream
listen = _listen
