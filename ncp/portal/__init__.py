"""Country B's portal for health professionals: login (password and TOTP, or a national OpenID
Connect provider), server-side sessions, the page shell in the HP's language, and the pages of
the use case. docs/portal.md describes it; ``ncp.portal.app.build_portal_app`` builds it."""
