"""Transport security and authorization: certificates (`pki`), the one channel factory and
server credentials (`tls`), and the authorization interceptor (`authz`)."""
