"""The chatproto terminal client: urwid on the Twisted reactor, over chatproto.client."""
