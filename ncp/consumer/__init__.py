"""Country B side: peer client, retriever, portal."""
