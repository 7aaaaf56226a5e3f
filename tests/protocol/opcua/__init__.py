"""OPC UA front-end tests: real asyncua and node-opcua clients against in-process servers."""
